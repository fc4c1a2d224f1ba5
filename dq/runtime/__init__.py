"""What every child process shares: its context, post-fork setup, logs, the reload hand-over."""
