//! Lockout: failed logins counted per account, per IP and per account+IP within a window;
//! more failures than the tenant's threshold lock the key for a period that doubles with
//! each lockout.
//!
//! The account and account+IP keys also count attempts *in flight*: an attempt may go on
//! to the password check only while confirmed failures plus attempts in flight stay within
//! the threshold. So a burst of parallel guesses at one account gets exactly as many
//! password checks as the same guesses made one after another (threshold + 1, the last of
//! which locks), never more. The IP key, shared by every account behind one address, only
//! counts confirmed failures: a burst across many accounts from one IP can pass its
//! threshold by the attempts in flight, but no account's.

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
    /// A user's second-factor codes (counted apart from passwords), by user id.
    Otp(String),
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
            Self::Otp(user) => format!("o\u{1f}{user}"),
        }
    }

    /// Whether the key counts attempts in flight and starts over on success: the account's
    /// own keys, not the IP shared by other accounts.
    pub fn gated(&self) -> bool {
        !matches!(self, Self::Ip(_))
    }
}

/// The state of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Confirmed failures in the current window.
    pub failures: u32,
    /// Attempts admitted and not yet finished (account keys only); forgotten with the
    /// window, so an attempt lost in a crash holds nothing for long.
    pub pending: u32,
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
    /// Yes; it is counted in flight until it finishes.
    Proceed,
    /// No: as many attempts as the threshold allows are already in flight.
    Busy,
    /// No: locked until then.
    Locked(OffsetDateTime),
}

impl Counter {
    /// A key never seen before.
    pub fn fresh(now: OffsetDateTime) -> Self {
        Self {
            failures: 0,
            pending: 0,
            window_start: now,
            locked_until: None,
            lockouts: 0,
        }
    }

    /// Admits one attempt at `now`, or says why not. `gated` keys (the account's) also
    /// count it in flight.
    pub fn admit(&mut self, policy: &LockoutPolicy, gated: bool, now: OffsetDateTime) -> Verdict {
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
        // Only a window that has run out starts over: an attempt stamped slightly earlier
        // than the window's start (clock skew between replicas) must not wipe the count.
        if now >= self.window_start + policy.window {
            self.failures = 0;
            self.pending = 0;
            self.window_start = now;
        }
        if gated {
            if self.failures.saturating_add(self.pending) > policy.threshold {
                return Verdict::Busy;
            }
            self.pending = self.pending.saturating_add(1);
        }
        Verdict::Proceed
    }

    /// The admitted attempt failed: one more failure, which locks the key when it is one
    /// too many.
    pub fn fail(&mut self, policy: &LockoutPolicy, gated: bool, now: OffsetDateTime) {
        if gated {
            self.pending = self.pending.saturating_sub(1);
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures > policy.threshold && self.locked_until.is_none_or(|until| until <= now) {
            let factor = 1u32 << self.lockouts.min(16);
            let period = policy.duration.saturating_mul(factor).min(MAX_LOCKOUT);
            self.lockouts = self.lockouts.saturating_add(1);
            self.locked_until = Some(now + period);
            self.failures = 0;
            self.window_start = now;
        }
    }

    /// The admitted attempt ended without an answer (a dependency failed, nothing was
    /// checked): it is no longer in flight, and nothing is counted.
    pub fn abandon(&mut self, gated: bool) {
        if gated {
            self.pending = self.pending.saturating_sub(1);
        }
    }

    /// The admitted attempt succeeded: an account key starts over; the IP key keeps its
    /// count (other accounts' failures).
    pub fn succeed(&mut self, key: &CounterKey) {
        if key.gated() {
            self.pending = self.pending.saturating_sub(1);
            self.failures = 0;
            self.lockouts = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + time::Duration::seconds(secs)
    }

    /// One sequential attempt on an account key: admitted, then failed.
    fn wrong(c: &mut Counter, policy: &LockoutPolicy, at: i64) -> Verdict {
        let verdict = c.admit(policy, true, t(at));
        if verdict == Verdict::Proceed {
            c.fail(policy, true, t(at));
        }
        verdict
    }

    #[test]
    fn the_sixth_failure_locks_and_the_lock_ends() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        for i in 0..6 {
            assert_eq!(
                wrong(&mut c, &policy, i),
                Verdict::Proceed,
                "attempt {}",
                i + 1
            );
        }
        assert_eq!(c.locked_until, Some(t(5 + 900)));
        assert_eq!(c.admit(&policy, true, t(100)), Verdict::Locked(t(905)));
        assert_eq!(c.admit(&policy, true, t(905)), Verdict::Proceed);
    }

    #[test]
    fn five_failures_then_the_right_password_get_in() {
        let policy = LockoutPolicy::default();
        let key = CounterKey::Account("ada@example.org".into());
        let mut c = Counter::fresh(t(0));
        for i in 0..5 {
            wrong(&mut c, &policy, i);
        }
        assert_eq!(c.admit(&policy, true, t(6)), Verdict::Proceed);
        c.succeed(&key);
        assert_eq!((c.failures, c.pending, c.lockouts), (0, 0, 0));
    }

    #[test]
    fn a_burst_gets_no_more_checks_than_the_same_attempts_in_a_row() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        let admitted = (0..20)
            .filter(|_| c.admit(&policy, true, t(0)) == Verdict::Proceed)
            .count();
        assert_eq!(admitted, 6);
        for _ in 0..6 {
            c.fail(&policy, true, t(1));
        }
        assert_eq!(c.lockouts, 1);
        assert!(matches!(c.admit(&policy, true, t(2)), Verdict::Locked(_)));
    }

    #[test]
    fn an_attempt_stamped_early_does_not_wipe_the_count_and_an_abandoned_one_is_released() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(100));
        for i in 0..5 {
            wrong(&mut c, &policy, 100 + i);
        }
        // A replica whose clock runs a little behind.
        assert_eq!(c.admit(&policy, true, t(90)), Verdict::Proceed);
        assert_eq!((c.failures, c.pending), (5, 1));
        c.abandon(true);
        assert_eq!((c.failures, c.pending), (5, 0));
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        for i in 0..5 {
            wrong(&mut c, &policy, i);
        }
        // The window has passed: counting starts again.
        for i in 0..5 {
            wrong(&mut c, &policy, 300 + i);
        }
        assert!(c.locked_until.is_none());
        wrong(&mut c, &policy, 306);
        assert!(c.locked_until.is_some());
    }

    #[test]
    fn each_lockout_doubles_up_to_a_day_and_a_quiet_day_forgets() {
        let policy = LockoutPolicy::default();
        let mut c = Counter::fresh(t(0));
        let mut now = 0;
        let mut periods = Vec::new();
        for _ in 0..9 {
            while c.locked_until.is_none_or(|u| u <= t(now)) {
                wrong(&mut c, &policy, now);
            }
            let until = c.locked_until.unwrap();
            periods.push((until - t(now)).whole_seconds());
            now = (until - t(0)).whole_seconds();
        }
        assert_eq!(
            periods,
            [900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 86400]
        );
        // A day after the last lock ended, the next lockout is a first one again.
        let later = now + 24 * 3600;
        while c.locked_until.is_none_or(|u| u <= t(later)) {
            wrong(&mut c, &policy, later);
        }
        assert_eq!(c.locked_until, Some(t(later + 900)));
    }

    #[test]
    fn the_ip_key_counts_failures_but_not_attempts_in_flight() {
        let policy = LockoutPolicy::default();
        let keys = CounterKey::for_attempt("Ada@Example.org", "192.0.2.1");
        let mut ip = Counter::fresh(t(0));
        for _ in 0..20 {
            assert_eq!(ip.admit(&policy, false, t(0)), Verdict::Proceed);
        }
        for _ in 0..3 {
            ip.fail(&policy, false, t(1));
        }
        ip.succeed(&keys[1]);
        assert_eq!(ip.failures, 3, "a success elsewhere does not clear the IP");
        assert_eq!(keys[0].storage_key(), "a\u{1f}ada@example.org");
    }
}
