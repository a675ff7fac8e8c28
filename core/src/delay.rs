//! Broker-held delays: any delay from 1 s to about 48 days, built from a fixed set of queues.
//!
//! RabbitMQ 3.10 from Debian has no delayed-message plugin, and per-message TTLs in one queue
//! expire only at the queue's head (a 1 h message would hold back a 1 s one behind it). So,
//! like NServiceBus's RabbitMQ transport, Warren keeps [`LEVELS`] delay queues, level `k`
//! holding every message for exactly `2^k` seconds (a queue-wide TTL, so first in is first out).
//! A delay is written in binary, one routing-key word per bit, most significant first,
//! followed by the destination queue's name:
//!
//! ```text
//! 5 s for "emails"  →  routing key  0.0.….0.1.0.1.emails   (22 bit words, then the queue)
//! ```
//!
//! The message is published to the topic exchange of the highest level. Each level's exchange
//! looks at its own bit: `1` routes the message into that level's queue, `0` passes it straight
//! on to the next lower level's exchange. When a level's TTL expires the queue dead-letters the
//! message (routing key unchanged) to the next lower level's exchange. After level 0 the message
//! reaches [`crate::topology::DELAY_DELIVER_EXCHANGE`], where each work queue is bound by
//! `*.*.….*.<queue>` (22 single-word wildcards then its name): exactly the destination queue.
//!
//! A delay is rounded to whole seconds, so it is off by at most half a second plus the
//! broker's hop time (a few milliseconds per level passed through).
//!
//! The exchange and queue names themselves are spelled in [`crate::topology`].

use std::time::Duration;

/// Number of delay levels: level `k` waits `2^k` seconds.
pub const LEVELS: u32 = 22;

/// The longest delay the levels can compose: `2^22 - 1` seconds, about 48.5 days.
pub const MAX_DELAY: Duration = Duration::from_secs((1 << LEVELS) - 1);

/// How long a message waits in level `level`'s queue.
pub fn level_ttl(level: u32) -> Duration {
    Duration::from_secs(1 << level)
}

/// Whole seconds a delay is carried as: rounded to the nearest second, at least 1 s for any
/// non-zero delay, and capped at [`MAX_DELAY`]. Zero means "no delay at all".
pub fn whole_seconds(delay: Duration) -> u64 {
    if delay.is_zero() {
        return 0;
    }
    let rounded = (delay.as_millis() + 500) / 1000;
    let seconds = u64::try_from(rounded).unwrap_or(u64::MAX);
    seconds.clamp(1, MAX_DELAY.as_secs())
}

/// The routing key that carries `seconds` of delay to `queue`: one `0`/`1` word per level,
/// highest level first, then the queue name.
pub fn routing_key(seconds: u64, queue: &str) -> String {
    let mut key = String::with_capacity(2 * LEVELS as usize + queue.len());
    for level in (0..LEVELS).rev() {
        key.push(if seconds >> level & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(queue);
    key
}

/// The topic pattern on level `level`'s exchange that matches keys whose bit for that level is
/// `bit`: the words of higher levels are skipped with `*`, the rest of the key with `#`.
pub fn level_pattern(level: u32, bit: bool) -> String {
    let mut pattern = "*.".repeat((LEVELS - 1 - level) as usize);
    pattern.push(if bit { '1' } else { '0' });
    pattern.push_str(".#");
    pattern
}

/// The pattern that binds `queue` on the deliver exchange: every bit word, then its name.
pub fn deliver_pattern(queue: &str) -> String {
    let mut pattern = "*.".repeat(LEVELS as usize);
    pattern.push_str(queue);
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the topology by hand: which level queues does a key pass through?
    fn levels_visited(key: &str) -> Vec<u32> {
        let words: Vec<&str> = key.split('.').collect();
        (0..LEVELS)
            .rev()
            .filter(|level| words[(LEVELS - 1 - level) as usize] == "1")
            .collect()
    }

    #[test]
    fn rounds_to_whole_seconds_within_half_a_second() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1499)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(70)), 70);
        assert_eq!(
            whole_seconds(Duration::from_secs(u64::MAX)),
            MAX_DELAY.as_secs()
        );
    }

    #[test]
    fn the_levels_visited_add_up_to_the_delay() {
        for seconds in [1, 5, 70, 3600, 30 * 24 * 3600, MAX_DELAY.as_secs()] {
            let key = routing_key(seconds, "emails");
            let total: u64 = levels_visited(&key).iter().map(|&l| 1u64 << l).sum();
            assert_eq!(total, seconds, "key {key}");
            assert!(key.ends_with(".emails"));
        }
        assert!(
            MAX_DELAY >= Duration::from_secs(30 * 24 * 3600),
            "covers 30 days"
        );
    }

    #[test]
    fn patterns_look_at_their_own_word() {
        assert_eq!(level_pattern(LEVELS - 1, true), "1.#");
        assert_eq!(level_pattern(0, false), format!("{}0.#", "*.".repeat(21)));
        // "#" matches zero or more words, so a pattern for level 0 still needs the queue words.
        assert_eq!(deliver_pattern("a.b"), format!("{}a.b", "*.".repeat(22)));
    }

    #[test]
    fn a_deliver_pattern_matches_only_its_own_queue() {
        // Topic matching with only `*` wildcards is word-by-word equality.
        let matches = |pattern: &str, key: &str| {
            let p: Vec<&str> = pattern.split('.').collect();
            let k: Vec<&str> = key.split('.').collect();
            p.len() == k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
        };
        let key = routing_key(5, "orders.high");
        assert!(matches(&deliver_pattern("orders.high"), &key));
        assert!(!matches(&deliver_pattern("high"), &key));
        assert!(!matches(&deliver_pattern("orders"), &key));
    }
}
