"""The checker role: ping every Redis shard, keep the shared health record, mail alerts.

Every `settings.checker_interval` seconds each shard gets a PING with a short timeout. A
shard that fails continuously for `settings.shard_down_after` seconds is marked DOWN in
`<data_dir>/health.json` (dq/sharding/health.py), which every server, timer and consumer of this
instance follows: adds go to the next shard in the tid's rendezvous order, and loops stop
working the shard. It is marked UP as soon as it answers again. One log line per change.

After each round it moves guests home (`sweep_guests`, dq/storage/guests.py): jobs written
to a shard while their owner was down go back to the owner once it answers, so that adding
one again cannot leave two copies that both fire. It records which shards hold guests
(`health.json`), so that adds on the owners evict older copies there meanwhile. And it
watches the registry's shard list (`watch_shards`): a change made in the console has the
master reload. A retired shard (the embedded Redis once real shards are configured,
dq/sharding/plan.py) has its jobs recorded as guests each round, so the same sweep moves them
to the shards (`Retirement`), until it holds no job.

Mail goes to the registry's Redis-down recipients (`AlertConf.redis_emails`): one when a
shard goes down and one when it comes back. Outage mails are rate-limited to one per shard
every `mail_every` seconds; an outage that starts within that window is mailed when the
window ends if the shard is still down (with a count of the outages in between), and a
recovery mail is sent only to answer an outage mail. So a flapping shard sends at most two
mails per window, and the last mail always tells the current state. Shards that change
state in the same round share one mail (a Redis Cluster's partitions on one master).

The package, by duty: `health` (the pings, the health record and the mails), `guests`
(guests moved home, retired shards emptied, php-delayqueue's jobs adopted), `watch` (the
registry's shard list watched, counters exported to dq_stat), `core` (`run`).
"""

from __future__ import annotations

from dq.roles.checker.core import run
from dq.roles.checker.guests import Retirement, sweep_guests
from dq.roles.checker.health import MAIL_EVERY, Checker, ShardState, ping
from dq.sharding.health import safe_name

__all__ = ["MAIL_EVERY", "Checker", "Retirement", "ShardState", "ping", "run", "safe_name",
           "sweep_guests"]
