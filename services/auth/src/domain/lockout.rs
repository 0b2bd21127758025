//! Lockout: failed logins counted per account, per IP and per account+IP within a window;
//! past the tenant's threshold the key locks for a period that doubles with each lockout.
//!
//! An attempt *reserves* its failure before the password is verified, and only a success
//! gives it back. So a burst of parallel attempts is counted exactly: once the threshold is
//! reached, the rest are refused without ever reaching the password check — no burst buys
//! extra guesses.

use std::time::Duration;

use time::OffsetDateTime;

/// The longest lockout, however often a key has been locked.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(24 * 3600);

/// A tenant's lockout thresholds (from its security policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures tolerated in `window`; one more locks.
    pub threshold: u32,
    /// The window failures are counted in.
    pub window: Duration,
    /// The first lockout's duration; each further one doubles it.
    pub duration: Duration,
}

impl Default for LockoutPolicy {
    /// The guide's defaults: more than 5 failures in 300 s lock for 15 minutes at first.
    fn default() -> Self {
        Self {
            threshold: 5,
            window: Duration::from_secs(300),
            duration: Duration::from_secs(15 * 60),
        }
    }
}

/// What one login attempt is counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterKey {
    /// The account, by case-folded email (so unknown accounts count the same way).
    Account(String),
    /// The client IP.
    Ip(String),
    /// The account from that IP.
    AccountIp(String, String),
}

impl CounterKey {
    /// The three keys of one attempt.
    pub fn for_attempt(email: &str, ip: &str) -> [Self; 3] {
        let account = email.to_lowercase();
        [
            Self::Account(account.clone()),
            Self::Ip(ip.to_owned()),
            Self::AccountIp(account, ip.to_owned()),
        ]
    }

    /// The stored form: the kind, then the parts, unambiguous.
    pub fn storage_key(&self) -> String {
        match self {
            Self::Account(account) => format!("a\u{1f}{account}"),
            Self::Ip(ip) => format!("i\u{1f}{ip}"),
            Self::AccountIp(account, ip) => format!("ai\u{1f}{account}\u{1f}{ip}"),
        }
    }

    /// Whether a success resets this key entirely (the account's own keys) or only gives
    /// back its reservation (the IP, shared by other accounts).
    pub fn reset_on_success(&self) -> bool {
        !matches!(self, Self::Ip(_))
    }
}

/// The state of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Failures (including reserved attempts) in the current window.
    pub failures: u32,
    /// When the current window started.
    pub window_start: OffsetDateTime,
    /// Locked until then, if locked.
    pub locked_until: Option<OffsetDateTime>,
    /// How many times the key has locked (the next lockout lasts `2^lockouts` periods).
    pub lockouts: u32,
}

/// Whether an attempt may go on to verify the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Yes; its failure is reserved.
    Proceed,
    /// No: locked until then.
    Locked(OffsetDateTime),
}

impl Counter {
    /// A key never seen before.
    pub fn fresh(now: OffsetDateTime) -> Self {
        Self {
            failures: 0,
            window_start: now,
            locked_until: None,
            lockouts: 0,
        }
    }

    /// Reserves one attempt at `now`.
    pub fn reserve(&mut self, policy: &LockoutPolicy, now: OffsetDateTime) -> Verdict {
        if let Some(until) = self.locked_until {
            if until > now {
                return Verdict::Locked(until);
            }
            // A day without a lockout forgets the earlier ones (an IP shared behind NAT is
            // not locked out for ever longer).
            if now >= until + MAX_LOCKOUT {
                self.lockouts = 0;
            }
            self.locked_until = None;
        }
        if now >= self.window_start + policy.window || now < self.window_start {
            self.failures = 0;
            self.window_start = now;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures > policy.threshold {
            let factor = 1u32 << self.lockouts.min(16);
            let period = policy.duration.saturating_mul(factor).min(MAX_LOCKOUT);
            let until = now + period;
            self.lockouts = self.lockouts.saturating_add(1);
            self.locked_until = Some(until);
            self.failures = 0;
            self.window_start = now;
            return Verdict::Locked(until);
        }
        Verdict::Proceed
    }

    /// The attempt succeeded: an account key starts over, the IP key gets its reservation
    /// back.
    pub fn succeed(&mut self, key: &CounterKey) {
        if key.reset_on_success() {
            self.failures = 0;
            self.lockouts = 0;
        } else {
            self.failures = self.failures.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + time::Duration::seconds(secs)
    }

    #[test]
    fn more_than_the_threshold_locks_and_the_lock_ends() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        for i in 0..5 {
            assert_eq!(
                c.reserve(&policy, t(i)),
                Verdict::Proceed,
                "attempt {}",
                i + 1
            );
        }
        let locked = c.reserve(&policy, t(5));
        assert_eq!(locked, Verdict::Locked(t(5 + 900)));
        assert_eq!(c.reserve(&policy, t(100)), Verdict::Locked(t(905)));
        assert_eq!(c.reserve(&policy, t(905)), Verdict::Proceed);
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        for i in 0..5 {
            assert_eq!(c.reserve(&policy, t(i)), Verdict::Proceed);
        }
        // The window has passed: counting starts again.
        for i in 0..5 {
            assert_eq!(c.reserve(&policy, t(300 + i)), Verdict::Proceed);
        }
        assert!(matches!(c.reserve(&policy, t(306)), Verdict::Locked(_)));
    }

    #[test]
    fn each_lockout_doubles_up_to_a_day() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        let mut now = 0;
        let mut periods = Vec::new();
        for _ in 0..9 {
            loop {
                if let Verdict::Locked(until) = c.reserve(&policy, t(now)) {
                    periods.push((until - t(now)).whole_seconds());
                    now = (until - t(0)).whole_seconds();
                    break;
                }
            }
        }
        assert_eq!(
            periods,
            [900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 86400]
        );
    }

    #[test]
    fn a_day_without_a_lockout_forgets_the_earlier_ones() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        for i in 0..6 {
            c.reserve(&policy, t(i));
        }
        assert_eq!(c.lockouts, 1);
        // Locked until t(905); a day after that, the next lockout is a first one again.
        let later = 905 + 24 * 3600;
        for i in 0..5 {
            assert_eq!(c.reserve(&policy, t(later + i)), Verdict::Proceed);
        }
        assert_eq!(
            c.reserve(&policy, t(later + 5)),
            Verdict::Locked(t(later + 5 + 900))
        );
    }

    #[test]
    fn success_resets_the_account_and_returns_the_ip_reservation() {
        let policy = LockoutPolicy::default();
        let keys = CounterKey::for_attempt("Ada@Example.org", "192.0.2.1");
        let mut account = Counter::fresh(t(0));
        let mut ip = Counter::fresh(t(0));
        for i in 0..3 {
            account.reserve(&policy, t(i));
            ip.reserve(&policy, t(i));
        }
        account.succeed(&keys[0]);
        ip.succeed(&keys[1]);
        assert_eq!(account.failures, 0);
        assert_eq!(ip.failures, 2);
        assert_eq!(keys[0].storage_key(), "a\u{1f}ada@example.org");
    }
}
