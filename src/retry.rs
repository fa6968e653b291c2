//! The retry policy, as pure functions: what to do after one delivery attempt (done, retry after
//! a delay, split the batch, give up), the jittered exponential backoff and `Retry-After`
//! parsing. No I/O, no clock, no randomness of its own: the caller passes the time and a random
//! number, so every decision is reproducible in tests.
//!
//! | outcome                                             | decision                              |
//! |-----------------------------------------------------|---------------------------------------|
//! | 2xx                                                 | `Done`                                |
//! | 413                                                 | `Split`                               |
//! | 429, 503 with a valid `Retry-After`                 | retry after it (capped at 5 min), plus a random part of up to half of it (0.25–5 s) |
//! | connect error, timeout, other transport error, 408, 429, 5xx | retry after jittered backoff |
//! | any other status (1xx, 3xx, other 4xx, >= 600)      | `GiveUp(Rejected(code))`              |
//!
//! A retry whose delay would end past the budget (`elapsed + delay > max_elapsed`) becomes
//! `GiveUp(RetryBudgetExhausted)`.

use std::time::{Duration, SystemTime};

/// First backoff cap (attempt 0).
pub(crate) const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Largest backoff cap, whatever the attempt.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured; longer ones are shortened to this.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Shortest and longest random part added to a `Retry-After` delay (half the delay, within
/// these): senders refused in one burst must not all come back in the same instant.
const RETRY_AFTER_SPREAD: (Duration, Duration) =
    (Duration::from_millis(250), Duration::from_secs(5));

/// What one delivery attempt ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome<'a> {
    /// The receiver answered.
    Status {
        /// HTTP status code.
        code: u16,
        /// The `Retry-After` header's value, if any.
        retry_after: Option<&'a str>,
    },
    /// No connection could be made (refused, DNS, TLS handshake, ...).
    ConnectError,
    /// The request timed out.
    Timeout,
    /// Any other transport failure (connection reset mid-body, broken response, ...).
    OtherTransportError,
}

/// What to do next with the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Delivered (2xx).
    Done,
    /// Send the same payload again after this delay.
    RetryAfter(Duration),
    /// 413: the body is too large for the receiver; split the batch in halves and send each.
    Split,
    /// Stop trying; the payload is lost (count and log it).
    GiveUp(GiveUpReason),
}

/// Why a payload was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GiveUpReason {
    /// The receiver refused it with this status (400, 401, 403, 404, any other 4xx but 408,
    /// 413 and 429, and unexpected 1xx/3xx/>= 600 statuses): retrying cannot help.
    Rejected(u16),
    /// The retry time budget (`CALLSCOPE_RETRY_MAX_ELAPSED_MS`) would be exceeded.
    RetryBudgetExhausted,
}

/// Exponential backoff with full jitter: before retry `attempt` (0-based), wait a uniformly
/// random time in `[0, min(max, initial * 2^attempt)]`, within a total budget `max_elapsed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    max_elapsed: Duration,
}

impl Backoff {
    /// 500 ms initial, 30 s max, and the given total retry budget
    /// (`Config::retry_max_elapsed`).
    pub(crate) fn new(max_elapsed: Duration) -> Self {
        Self {
            initial: INITIAL_BACKOFF,
            max: MAX_BACKOFF,
            max_elapsed,
        }
    }

    /// Upper bound of the delay after failed attempt `attempt` (0 = the first attempt):
    /// `min(max, initial * 2^attempt)`, without overflow for any `attempt`.
    fn cap(&self, attempt: u32) -> Duration {
        1u32.checked_shl(attempt)
            .and_then(|factor| self.initial.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The delay after failed attempt `attempt` (0 = the first attempt): `rand01 * cap`, with
    /// `rand01` uniform in `[0, 1]` (e.g. `fastrand::f64()`; clamped, NaN counts as 0).
    /// Never more than the max (30 s).
    pub(crate) fn delay(&self, attempt: u32, rand01: f64) -> Duration {
        let cap = self.cap(attempt);
        let r = unit(rand01);
        // `r` is in [0, 1], so the product is at most `cap` but for float rounding, which
        // `min` (and the fallback, for a cap near `Duration::MAX`) absorb: never a panic.
        Duration::try_from_secs_f64(cap.as_secs_f64() * r)
            .unwrap_or(cap)
            .min(cap)
    }
}

/// `r` within `[0, 1]` (a negative number or NaN as 0).
fn unit(r: f64) -> f64 {
    if r >= 1.0 {
        1.0
    } else if r > 0.0 {
        r
    } else {
        0.0
    }
}

/// Decides what follows one attempt.
///
/// `attempt` is the 0-based number of the attempt that just ended, `elapsed` the time since the
/// payload's first attempt started, `now` the wall clock (for `Retry-After` dates) and `rand01`
/// a uniform random number in `[0, 1]` for the jitter.
pub(crate) fn decide(
    outcome: &Outcome<'_>,
    attempt: u32,
    elapsed: Duration,
    backoff: &Backoff,
    now: SystemTime,
    rand01: f64,
) -> Decision {
    let delay = match *outcome {
        Outcome::Status { code, retry_after } => match code {
            200..=299 => return Decision::Done,
            413 => return Decision::Split,
            429 | 503 => match retry_after.and_then(|value| parse_retry_after(value, now)) {
                Some(after) => {
                    let spread = (after / 2).clamp(RETRY_AFTER_SPREAD.0, RETRY_AFTER_SPREAD.1);
                    // The random part never turns a wait that fits the budget into giving up.
                    let room = backoff.max_elapsed.saturating_sub(elapsed).max(after);
                    (after + spread.mul_f64(unit(rand01))).min(room)
                }
                None => backoff.delay(attempt, rand01),
            },
            408 | 500..=599 => backoff.delay(attempt, rand01),
            _ => return Decision::GiveUp(GiveUpReason::Rejected(code)),
        },
        Outcome::ConnectError | Outcome::Timeout | Outcome::OtherTransportError => {
            backoff.delay(attempt, rand01)
        }
    };
    if elapsed.saturating_add(delay) > backoff.max_elapsed {
        Decision::GiveUp(GiveUpReason::RetryBudgetExhausted)
    } else {
        Decision::RetryAfter(delay)
    }
}

/// Parses a `Retry-After` value: delay-seconds (`"120"`) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`, also the obsolete RFC 850 and asctime forms). A date in
/// the past gives `Duration::ZERO`; anything else unparseable gives `None`. The result is capped
/// at 5 minutes.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let delay = if value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: a number too large for u64 is still a (very long) delay.
        value
            .parse::<u64>()
            .map_or(MAX_RETRY_AFTER, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2015-10-21T07:28:00Z, the date of the RFC example.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
    }

    const BUDGET: Duration = Duration::from_secs(300);

    fn status(code: u16) -> Outcome<'static> {
        Outcome::Status {
            code,
            retry_after: None,
        }
    }

    fn decide_simple(outcome: &Outcome<'_>) -> Decision {
        decide(
            outcome,
            0,
            Duration::ZERO,
            &Backoff::new(BUDGET),
            now(),
            1.0,
        )
    }

    #[test]
    fn success_is_done() {
        for code in [200, 201, 202, 204, 206, 299] {
            assert_eq!(decide_simple(&status(code)), Decision::Done, "{code}");
        }
        // Even with a Retry-After header, and even out of budget.
        let outcome = Outcome::Status {
            code: 200,
            retry_after: Some("10"),
        };
        let d = decide(
            &outcome,
            50,
            Duration::MAX,
            &Backoff::new(Duration::ZERO),
            now(),
            0.5,
        );
        assert_eq!(d, Decision::Done);
    }

    #[test]
    fn too_large_splits() {
        assert_eq!(decide_simple(&status(413)), Decision::Split);
        let d = decide(
            &status(413),
            9,
            Duration::MAX,
            &Backoff::new(Duration::ZERO),
            now(),
            0.5,
        );
        assert_eq!(d, Decision::Split);
    }

    #[test]
    fn client_errors_give_up_at_once() {
        for code in [
            400, 401, 403, 404, 405, 409, 410, 411, 412, 414, 415, 422, 451, 499,
        ] {
            assert_eq!(
                decide_simple(&status(code)),
                Decision::GiveUp(GiveUpReason::Rejected(code)),
                "{code}"
            );
        }
    }

    #[test]
    fn unexpected_statuses_give_up() {
        for code in [
            0,
            100,
            101,
            199,
            300,
            301,
            302,
            304,
            307,
            308,
            600,
            999,
            u16::MAX,
        ] {
            assert_eq!(
                decide_simple(&status(code)),
                Decision::GiveUp(GiveUpReason::Rejected(code)),
                "{code}"
            );
        }
    }

    #[test]
    fn retryable_statuses_and_transport_errors_back_off() {
        let mut outcomes: Vec<Outcome<'static>> = [408, 429, 500, 501, 502, 503, 504, 507, 599]
            .into_iter()
            .map(status)
            .collect();
        outcomes.extend([
            Outcome::ConnectError,
            Outcome::Timeout,
            Outcome::OtherTransportError,
        ]);
        let backoff = Backoff::new(BUDGET);
        for outcome in &outcomes {
            for attempt in [0, 1, 2, 5, 10, 100] {
                assert_eq!(
                    decide(outcome, attempt, Duration::ZERO, &backoff, now(), 1.0),
                    Decision::RetryAfter(backoff.delay(attempt, 1.0)),
                    "{outcome:?} attempt {attempt}"
                );
                assert_eq!(
                    decide(outcome, attempt, Duration::ZERO, &backoff, now(), 0.0),
                    Decision::RetryAfter(Duration::ZERO),
                    "{outcome:?} attempt {attempt}"
                );
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_for_429_and_503_only() {
        let backoff = Backoff::new(BUDGET);
        for code in [429, 503] {
            // What follows attempt `attempt` answered with `Retry-After: value`, for `rand01`.
            let after = |value: &str, attempt: u32, rand01: f64| {
                let outcome = Outcome::Status {
                    code,
                    retry_after: Some(value),
                };
                decide(&outcome, attempt, Duration::ZERO, &backoff, now(), rand01)
            };
            let wait = |ms: u64| Decision::RetryAfter(Duration::from_millis(ms));
            // The server's delay, not the backoff's (which would be <= 500 ms here), plus a
            // random part of up to half of it, within 0.25-5 s.
            assert_eq!(after("120", 0, 0.0), wait(120_000));
            assert_eq!(after("120", 0, 1.0), wait(125_000));
            // Also when it is shorter than the backoff would be.
            assert_eq!(after("1", 10, 0.0), wait(1_000));
            assert_eq!(after("1", 10, 1.0), wait(1_500));
            assert_eq!(after("0", 0, 0.5), wait(125));
            // As a date.
            assert_eq!(after("Wed, 21 Oct 2015 07:29:00 GMT", 0, 0.0), wait(60_000));
            // Garbage: fall back to the backoff.
            assert_eq!(
                after("soon", 3, 0.5),
                Decision::RetryAfter(backoff.delay(3, 0.5))
            );
        }
        for code in [408, 500, 502, 504] {
            let outcome = Outcome::Status {
                code,
                retry_after: Some("120"),
            };
            assert_eq!(
                decide(&outcome, 0, Duration::ZERO, &backoff, now(), 1.0),
                Decision::RetryAfter(INITIAL_BACKOFF),
                "{code}"
            );
        }
    }

    #[test]
    fn budget_exhaustion() {
        let backoff = Backoff::new(Duration::from_secs(10));
        // attempt 0, r = 1 → 500 ms.
        let at = |elapsed: Duration| decide(&Outcome::Timeout, 0, elapsed, &backoff, now(), 1.0);
        assert_eq!(
            at(Duration::from_millis(9_500)),
            Decision::RetryAfter(Duration::from_millis(500))
        );
        assert_eq!(
            at(Duration::from_millis(9_501)),
            Decision::GiveUp(GiveUpReason::RetryBudgetExhausted)
        );
        assert_eq!(
            at(Duration::MAX),
            Decision::GiveUp(GiveUpReason::RetryBudgetExhausted)
        );
        // A Retry-After past the budget gives up too.
        let outcome = Outcome::Status {
            code: 503,
            retry_after: Some("11"),
        };
        assert_eq!(
            decide(&outcome, 0, Duration::ZERO, &backoff, now(), 0.0),
            Decision::GiveUp(GiveUpReason::RetryBudgetExhausted)
        );
        // A zero budget allows only zero-delay retries at zero elapsed time.
        let none = Backoff::new(Duration::ZERO);
        assert_eq!(
            decide(&Outcome::ConnectError, 0, Duration::ZERO, &none, now(), 0.5),
            Decision::GiveUp(GiveUpReason::RetryBudgetExhausted)
        );
        assert_eq!(
            decide(&Outcome::ConnectError, 0, Duration::ZERO, &none, now(), 0.0),
            Decision::RetryAfter(Duration::ZERO)
        );
        // Rejections are rejections whatever the budget.
        assert_eq!(
            decide(&status(401), 0, Duration::MAX, &none, now(), 0.5),
            Decision::GiveUp(GiveUpReason::Rejected(401))
        );
    }

    #[test]
    fn a_retry_sequence_ends_within_budget() {
        let backoff = Backoff::new(Duration::from_secs(300));
        let mut elapsed = Duration::ZERO;
        let mut attempt = 0;
        loop {
            match decide(
                &Outcome::ConnectError,
                attempt,
                elapsed,
                &backoff,
                now(),
                1.0,
            ) {
                Decision::RetryAfter(delay) => {
                    elapsed += delay;
                    attempt += 1;
                }
                Decision::GiveUp(GiveUpReason::RetryBudgetExhausted) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(elapsed <= Duration::from_secs(300));
        // 0.5+1+2+4+8+16 = 31.5 s, then 30 s steps: 31.5 + 30*8 = 271.5 s, the next overshoots.
        assert_eq!(attempt, 14);
        assert_eq!(elapsed, Duration::from_millis(271_500));
    }

    #[test]
    fn delay_caps_double_up_to_the_max() {
        let b = Backoff::new(BUDGET);
        let expected_ms = [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000];
        for (attempt, ms) in (0u32..).zip(expected_ms) {
            assert_eq!(
                b.delay(attempt, 1.0),
                Duration::from_millis(ms),
                "{attempt}"
            );
        }
        for attempt in [31, 32, 33, 63, 64, 1000, u32::MAX] {
            assert_eq!(b.delay(attempt, 1.0), MAX_BACKOFF, "{attempt}");
        }
    }

    #[test]
    fn delay_is_full_jitter() {
        let b = Backoff::new(BUDGET);
        assert_eq!(b.delay(0, 0.0), Duration::ZERO);
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(250));
        assert_eq!(b.delay(3, 0.25), Duration::from_millis(1000));
        assert_eq!(b.delay(20, 0.5), Duration::from_secs(15));
        // Out-of-range randomness is clamped, NaN counts as 0.
        assert_eq!(b.delay(2, -1.0), Duration::ZERO);
        assert_eq!(b.delay(2, f64::NAN), Duration::ZERO);
        assert_eq!(b.delay(2, f64::NEG_INFINITY), Duration::ZERO);
        assert_eq!(b.delay(2, 7.0), Duration::from_secs(2));
        assert_eq!(b.delay(2, f64::INFINITY), Duration::from_secs(2));
    }

    #[test]
    fn delay_cap_is_overflow_safe_with_any_parameters() {
        let b = Backoff {
            initial: Duration::MAX,
            max: Duration::MAX,
            max_elapsed: Duration::MAX,
        };
        for attempt in [0, 1, 2, 31, 32, u32::MAX] {
            let _ = b.delay(attempt, 1.0);
            let _ = b.delay(attempt, 0.999);
        }
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(u64::MAX / 4),
            max_elapsed: Duration::MAX,
        };
        assert_eq!(b.cap(31), Duration::from_secs(1 << 31));
        assert_eq!(b.cap(32), b.max);
        assert!(b.delay(40, 1.0) <= b.max);
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("0", now()), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("120", now()),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after(" 7 ", now()),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("007", now()),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after("300", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("301", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("86400", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("99999999999999999999999999", now()),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_dates() {
        // IMF-fixdate, RFC 850 and asctime forms of now + 60 s.
        for value in [
            "Wed, 21 Oct 2015 07:29:00 GMT",
            "Wednesday, 21-Oct-15 07:29:00 GMT",
            "Wed Oct 21 07:29:00 2015",
        ] {
            assert_eq!(
                parse_retry_after(value, now()),
                Some(Duration::from_secs(60)),
                "{value}"
            );
        }
        // Now, and in the past.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now()),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        // Far future is capped.
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now()),
            Some(MAX_RETRY_AFTER)
        );
        // Sub-second precision of `now` is respected.
        let later = now() + Duration::from_millis(250);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:01 GMT", later),
            Some(Duration::from_millis(750))
        );
    }

    #[test]
    fn retry_after_garbage() {
        for value in [
            "",
            "   ",
            "-1",
            "+5",
            "1.5",
            "1e3",
            "12 s",
            "soon",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 07:28:00",
            "2015-10-21T07:29:00Z",
            "\u{663}",
        ] {
            assert_eq!(parse_retry_after(value, now()), None, "{value:?}");
        }
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_max(attempt in any::<u32>(), r in any::<f64>()) {
            let b = Backoff::new(BUDGET);
            prop_assert!(b.delay(attempt, r) <= MAX_BACKOFF);
            prop_assert!(b.delay(attempt, r) <= b.cap(attempt));
        }

        #[test]
        fn delay_in_unit_range_never_exceeds_max(attempt in 0u32..80, r in 0.0f64..=1.0) {
            let b = Backoff::new(BUDGET);
            prop_assert!(b.delay(attempt, r) <= MAX_BACKOFF);
        }

        #[test]
        fn cap_is_monotone(attempt in 0u32..u32::MAX) {
            let b = Backoff::new(BUDGET);
            prop_assert!(b.cap(attempt) <= b.cap(attempt + 1));
            prop_assert!(b.delay(attempt, 1.0) <= b.delay(attempt + 1, 1.0));
        }

        #[test]
        fn delay_is_monotone_in_randomness(
            attempt in 0u32..64,
            a in 0.0f64..=1.0,
            b in 0.0f64..=1.0,
        ) {
            let backoff = Backoff::new(BUDGET);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(backoff.delay(attempt, lo) <= backoff.delay(attempt, hi));
        }

        #[test]
        fn retries_stay_within_budget(
            code in any::<u16>(),
            attempt in any::<u32>(),
            elapsed_ms in 0u64..1_000_000,
            budget_ms in 0u64..1_000_000,
            r in any::<f64>(),
            retry_after in proptest::option::of("[0-9]{0,6}"),
        ) {
            let backoff = Backoff::new(Duration::from_millis(budget_ms));
            let elapsed = Duration::from_millis(elapsed_ms);
            let outcome = Outcome::Status { code, retry_after: retry_after.as_deref() };
            match decide(&outcome, attempt, elapsed, &backoff, now(), r) {
                Decision::RetryAfter(delay) => {
                    prop_assert!(elapsed + delay <= Duration::from_millis(budget_ms));
                    prop_assert!(delay <= MAX_RETRY_AFTER + RETRY_AFTER_SPREAD.1);
                }
                Decision::Done => prop_assert!((200..300).contains(&code)),
                Decision::Split => prop_assert_eq!(code, 413),
                Decision::GiveUp(GiveUpReason::Rejected(c)) => {
                    prop_assert_eq!(c, code);
                    prop_assert!(!matches!(code, 200..=299 | 408 | 413 | 429 | 500..=599));
                }
                Decision::GiveUp(GiveUpReason::RetryBudgetExhausted) => {
                    prop_assert!(matches!(code, 408 | 429 | 500..=599));
                }
            }
        }

        /// A Retry-After is waited at least, at most its random part longer, and only past
        /// the budget given up: the random part never makes a wait that fits give up.
        #[test]
        fn a_retry_after_that_fits_the_budget_is_waited(
            code in proptest::sample::select(vec![429u16, 503]),
            after_s in 0u64..400,
            elapsed_ms in 0u64..1_000_000,
            // The budget ends near where the wait would: within the random part's reach.
            slack_ms in -6_000i64..6_000,
            r in any::<f64>(),
        ) {
            let capped_ms = after_s.min(MAX_RETRY_AFTER.as_secs()) * 1000;
            let budget_ms = (elapsed_ms + capped_ms).saturating_add_signed(slack_ms);
            let backoff = Backoff::new(Duration::from_millis(budget_ms));
            let elapsed = Duration::from_millis(elapsed_ms);
            let value = after_s.to_string();
            let outcome = Outcome::Status { code, retry_after: Some(&value) };
            let after = Duration::from_secs(after_s).min(MAX_RETRY_AFTER);
            let fits = elapsed + after <= Duration::from_millis(budget_ms);
            match decide(&outcome, 0, elapsed, &backoff, now(), r) {
                Decision::RetryAfter(delay) => {
                    prop_assert!(fits);
                    prop_assert!(delay >= after);
                    prop_assert!(delay <= after + (after / 2).clamp(RETRY_AFTER_SPREAD.0, RETRY_AFTER_SPREAD.1));
                    prop_assert!(elapsed + delay <= Duration::from_millis(budget_ms));
                }
                Decision::GiveUp(GiveUpReason::RetryBudgetExhausted) => prop_assert!(!fits),
                other => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn retry_after_never_panics_and_is_capped(value in ".{0,40}") {
            if let Some(d) = parse_retry_after(&value, now()) {
                prop_assert!(d <= MAX_RETRY_AFTER);
            }
        }
    }
}
