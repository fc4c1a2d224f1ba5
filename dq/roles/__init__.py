"""The child roles (server, timer, consumer, checker) and what they call on (callback,
alerts, flow control, breakers, the callback network policy). Roles never import each other."""
