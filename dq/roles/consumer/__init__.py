"""Consumer role: claim ready jobs, call their topic's callback, then ack, retry or bury.

Per shard one claim loop leases up to the free slots (`settings.concurrency` callbacks in
flight per consumer process; at most the shard's share of them at a time, so a claim on a
shard that hangs leaves the others theirs), trying the ready lists in a weighted random
priority order, and backs off from 5 to 50 ms while nothing is ready. Each claimed job runs
as its own task:

- success (see dq/roles/callback.py for the request, its signature and what counts as success):
  ack; the job is gone.
- failure with attempts left (attempt n, 0-based, of max_attempts = the topic's, else the
  settings'): retry after the wait the topic's retry_policy gives (dq/registry/retry_policy.py; by
  default (2n+1) retry units).
- a 429 or 503 reply with Retry-After: the job waits that long (at least 1 s, at most
  `retry_after_max`), rescheduled without counting an attempt (the call is counted in the
  statistics as a failed one), its error shown meanwhile.
- a topic with a circuit breaker (dq/roles/breaker.py): while it is open, claimed jobs are parked
  until the cool-off ends, not called and not counted; every outcome is told to it, and an
  opening or closing is mailed to the topic's emails (owed until sent, like dead letters).
- failure on the last attempt: bury as a dead letter with the last status, error and reply
  excerpt, and mail the topic's alert addresses (in the background). The mail is owed
  until sent (dq/storage/alerts.py): one its consumer did not get out (it died or was stopped
  first, or the mail server failed) is mailed by the sweep of the consumer with
  Duty.ALERT_SWEEP (consumer 0), for up to 24 hours.
- flow control (a topic's rate_limit, concurrency and paused): the claim script takes
  each flow-controlled topic's share of the limits for the shard (dq/roles/flow.py, from the
  cached registry), and holds back the jobs it may not call yet in the topic's held list
  on the shard (dq/storage/lua/claim.lua), so they hold up no other topic. A job that took a
  concurrency slot gives it back once its outcome is written (release.lua), or when its
  lease runs out (requeue_expired.lua).
- a topic that is unknown or offline: the job is parked, not called, not counted as an
  attempt and not lost: it goes back to its delay bucket (dq/storage/lua/park.lua), due again in
  `lease` seconds, so it is looked at every `lease` seconds until the topic is online (or
  the job is deleted).
- anything unexpected while calling counts as a failed attempt; a write that fails leaves
  the lease to expire, so the job is delivered again (at-least-once).
- a delivery cut off (its consumer died or hung, so its lease ran out) counts as an
  attempt: the timer that requeues it adds one (dq/storage/lua/requeue_expired.lua), the next
  call says `X-Dq-Attempt: 2`, and a job claimed with all its attempts used that way is
  kept as a dead letter without another call (a job whose call kills its consumer cannot
  loop). max_attempts thus caps the calls started, whatever became of them.
- a callback never runs longer than 90% of the lease (a topic timeout beyond that is cut,
  with one warning), so a job is not delivered a second time while its first call runs.

Stopping: when `ctx.stopping` is set the claim loops stop, callbacks in flight get
`settings.grace` seconds to finish, the rest are cancelled (their leases expire and timers
requeue them). A final write survives that cancellation: an ack is queued in the loop
turn's batched ack call before the delivery first waits, and retry/bury are shielded.

The package: `core` (the claim loops, the slots, `run`), `deliver` (one job, from its claim
to its outcome), `alerts` (dead-letter and breaker mails, and the sweep of those owed),
`priority` (the weighted order of the ready lists).
"""

from __future__ import annotations

from dq.roles.callback import open_session
from dq.roles.consumer.core import Consumer, Slots, run
from dq.roles.consumer.deliver import max_attempts, retry_delay_ms
from dq.roles.consumer.priority import priority_order

__all__ = ["Consumer", "Slots", "max_attempts", "open_session", "priority_order",
           "retry_delay_ms", "run"]
