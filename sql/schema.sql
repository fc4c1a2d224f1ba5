-- dq registry schema for MySQL / MariaDB.
--
-- A column superset of php-delayqueue's dq.sql: same tables, same columns and defaults,
-- plus new columns that all have defaults, so the original console and dq can share one
-- database. dq runs the equivalent of this file itself on first start (dq/registry/core.py,
-- create_tables), so running it by hand is optional.
--
-- Differences from the original, for new databases only:
--   * utf8mb4 everywhere;
--   * dq_topic.topic compares case-sensitively (utf8mb4_bin) and is a UNIQUE key;
--   * dq_stat.create_time defaults to CURRENT_TIMESTAMP, because strict SQL modes refuse
--     the original's '0000-00-00 00:00:00'.

CREATE TABLE IF NOT EXISTS `dq_alert` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `host` varchar(255) NOT NULL DEFAULT '',
  `port` int(11) NOT NULL DEFAULT '0',
  `user` varchar(255) NOT NULL DEFAULT '',
  `pwd` varchar(255) NOT NULL DEFAULT '',
  `ext` varchar(2048) NOT NULL DEFAULT '',
  `tls` varchar(16) NOT NULL DEFAULT '' COMMENT 'empty, starttls or ssl',
  `sender` varchar(255) NOT NULL DEFAULT '' COMMENT 'From address; empty = user',
  `redis_emails` varchar(1024) NOT NULL DEFAULT '' COMMENT 'comma separated; Redis-down alerts',
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS `dq_redis` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `t_name` varchar(200) NOT NULL DEFAULT '',
  `t_content` varchar(2048) NOT NULL DEFAULT '' COMMENT 'host:port[:auth] or redis://, rediss://, unix:// URL',
  `status` tinyint(4) NOT NULL DEFAULT '1' COMMENT '1 = enabled',
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS `dq_topic` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `t_name` varchar(1024) NOT NULL DEFAULT '',
  `delay` int(11) NOT NULL DEFAULT '0' COMMENT 'seconds',
  `callback` varchar(1024) NOT NULL DEFAULT '',
  `timeout` int(11) NOT NULL DEFAULT '3000' COMMENT 'ms',
  `email` varchar(1024) NOT NULL DEFAULT '' COMMENT 'comma separated',
  `topic` varchar(255) COLLATE utf8mb4_bin NOT NULL DEFAULT '',
  `re_notify_flag` varchar(1024) NOT NULL DEFAULT '重试标记' COMMENT 'retry_when expression',
  `createor` varchar(1024) NOT NULL DEFAULT '',
  `status` tinyint(4) NOT NULL DEFAULT '1' COMMENT '1 = online, else offline',
  `method` varchar(32) NOT NULL DEFAULT 'GET',
  `priority` int(11) NOT NULL DEFAULT '2' COMMENT '1 high, 2 normal, 3 low',
  `max_attempts` int(11) NOT NULL DEFAULT '10' COMMENT '0 = the server default',
  `secret` varchar(255) NOT NULL DEFAULT '' COMMENT 'callback signing key',
  `body_format` varchar(16) NOT NULL DEFAULT 'form' COMMENT 'form|json|query',
  `rate_limit` int(11) NOT NULL DEFAULT '0' COMMENT 'callbacks per second, 0 = no limit',
  `concurrency` int(11) NOT NULL DEFAULT '0' COMMENT 'callbacks in flight, 0 = no limit',
  `paused` tinyint(4) NOT NULL DEFAULT '0' COMMENT '1 = adds kept, nothing called',
  `retry_policy` varchar(255) NOT NULL DEFAULT 'linear' COMMENT 'linear|exp:30s,2,1h|list:1m,5m',
  `breaker_threshold` int(11) NOT NULL DEFAULT '0' COMMENT 'failures in a row, 0 = no breaker',
  `breaker_cooloff` int(11) NOT NULL DEFAULT '60' COMMENT 'seconds before the probe',
  `headers` varchar(2048) NOT NULL DEFAULT '' COMMENT 'JSON object of request headers',
  `updated_at` datetime DEFAULT NULL COMMENT 'set by dq; NULL for rows the original wrote',
  PRIMARY KEY (`id`),
  UNIQUE KEY `uk_topic` (`topic`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS `dq_stat` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `u_key` varchar(255) NOT NULL DEFAULT '',
  `num` int(11) NOT NULL DEFAULT '0',
  `create_time` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `update_time` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  PRIMARY KEY (`id`),
  UNIQUE KEY `u_key` (`u_key`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- dq only: how much of each of dq's Redis counters has been added to dq_stat (dq/roles/statexport.py),
-- so that several dq instances exporting them never count a gain twice.
CREATE TABLE IF NOT EXISTS `dq_stat_mark` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `mark` varchar(255) NOT NULL DEFAULT '',
  `num` bigint(20) NOT NULL DEFAULT '0',
  `day` varchar(8) NOT NULL DEFAULT '' COMMENT 'YYYYMMDD of a per-day counter, empty for a total',
  `update_time` datetime DEFAULT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `uk_mark` (`mark`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Upgrading an existing php-delayqueue database. dq adds these columns (and creates
-- dq_stat_mark) by itself on first start when its database user may ALTER and CREATE;
-- otherwise run this file (it creates only the missing tables) and these ALTERs by hand. The
-- original console keeps working afterwards (it never names these columns). No unique
-- key is added to dq_topic.topic: old databases may hold duplicate topics, and dq reads
-- the row with the highest id.
--
-- ALTER TABLE `dq_topic` ADD COLUMN `max_attempts` int(11) NOT NULL DEFAULT '10';
-- ALTER TABLE `dq_topic` ADD COLUMN `secret` varchar(255) NOT NULL DEFAULT '';
-- ALTER TABLE `dq_topic` ADD COLUMN `body_format` varchar(16) NOT NULL DEFAULT 'form';
-- ALTER TABLE `dq_topic` ADD COLUMN `rate_limit` int(11) NOT NULL DEFAULT '0';
-- ALTER TABLE `dq_topic` ADD COLUMN `concurrency` int(11) NOT NULL DEFAULT '0';
-- ALTER TABLE `dq_topic` ADD COLUMN `paused` tinyint(4) NOT NULL DEFAULT '0';
-- ALTER TABLE `dq_topic` ADD COLUMN `retry_policy` varchar(255) NOT NULL DEFAULT 'linear';
-- ALTER TABLE `dq_topic` ADD COLUMN `breaker_threshold` int(11) NOT NULL DEFAULT '0';
-- ALTER TABLE `dq_topic` ADD COLUMN `breaker_cooloff` int(11) NOT NULL DEFAULT '60';
-- ALTER TABLE `dq_topic` ADD COLUMN `headers` varchar(2048) NOT NULL DEFAULT '';
-- UPDATE `dq_topic` SET `body_format` = 'query';  -- the original sent fields in the URL
-- ALTER TABLE `dq_topic` ADD COLUMN `updated_at` datetime DEFAULT NULL;
-- ALTER TABLE `dq_redis` ADD COLUMN `status` tinyint(4) NOT NULL DEFAULT '1';
-- ALTER TABLE `dq_alert` ADD COLUMN `tls` varchar(16) NOT NULL DEFAULT '';
-- ALTER TABLE `dq_alert` ADD COLUMN `sender` varchar(255) NOT NULL DEFAULT '';
-- ALTER TABLE `dq_alert` ADD COLUMN `redis_emails` varchar(1024) NOT NULL DEFAULT '';
