"""What the tests share (no test module imports another test module; they import these):

procs        free ports (a slice per xdist worker), starting a Redis on one, one command to
             it, stopping a process
redisproc    RedisProcess: a redis-server of a test's own; SharedRedis: one per worker,
             lent a clean database (RedisDb) at a time
kinds        which tests are system, integration or unit, and which need their own Redis
waits        wait_until / until: waiting on a condition, not a fixed time
receiver     a real HTTP/1.1 callback receiver
roles        timers and consumers as tasks of the test's loop; an SMTP mailbox
masters      a real dq-master (python -m dq.cli) and its children through /proc
sentinels    a Redis Sentinel set-up (master, replicas, 3 sentinels)
rediscluster a Redis Cluster of 3 masters + 3 replicas
paths        the repository, the browser tests' artifacts directory
server       a dq server as a task of the test's loop, raw framed exchanges
chaos        registry file, flaky receiver, acknowledged adds (chaos, cluster, Sentinel)
health       the health tests' settings, Prometheus samples
registry     the original php-delayqueue schemas
web          the console under test (httpx ASGI), login, forms, an SMTP inbox
browser      headless Chromium and a live console
"""
