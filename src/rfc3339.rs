//! RFC 3339 UTC timestamps with nanoseconds (`2026-11-24T10:15:30.123456789Z`), the wire
//! contract's time format, written straight into a buffer.
//!
//! Any `SystemTime` is written, never a panic: span times are the app's to set, and RFC 3339
//! has four-digit years, so a time before `0000-01-01T00:00:00Z` or after the end of 9999 is
//! written as that bound. (humantime, used before, panics before 1970 and after 9999, which
//! stopped the worker thread.)

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes of a timestamp, without quotes.
pub(crate) const LEN: usize = 30;

/// Seconds from the epoch to 0000-01-01T00:00:00Z.
const MIN_SECS: i64 = -62_167_219_200;
/// Seconds from the epoch to 9999-12-31T23:59:59Z.
const MAX_SECS: i64 = 253_402_300_799;

/// Seconds and nanoseconds since the epoch (seconds floor towards the past), within the years
/// 0000 to 9999.
fn split(t: SystemTime) -> (i64, u32) {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let s = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-s, 0),
                n => (-s - 1, 1_000_000_000 - n),
            }
        }
    };
    if secs < MIN_SECS {
        (MIN_SECS, 0)
    } else if secs > MAX_SECS {
        (MAX_SECS, 999_999_999)
    } else {
        (secs, nanos)
    }
}

/// The civil date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u32; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = i64::from(yoe) + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// "00" to "99", two bytes each.
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Writes `n` as `N` decimal digits (zero-padded) into `out`, two at a time (half the
/// divisions of one at a time: the worker writes two timestamps per span).
#[inline]
fn digits<const N: usize>(out: &mut [u8], mut n: u32) {
    let mut end = N;
    while end >= 2 {
        let p = (n % 100) as usize * 2;
        out[end - 2..end].copy_from_slice(&PAIRS[p..p + 2]);
        n /= 100;
        end -= 2;
    }
    if end == 1 {
        out[0] = b'0' + (n % 10) as u8;
    }
}

/// The timestamp's bytes.
pub(crate) fn format(t: SystemTime) -> [u8; LEN] {
    let (secs, nanos) = split(t);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    let mut b = *b"0000-00-00T00:00:00.000000000Z";
    digits::<4>(&mut b[0..], year.clamp(0, 9999) as u32);
    digits::<2>(&mut b[5..], month);
    digits::<2>(&mut b[8..], day);
    digits::<2>(&mut b[11..], sod / 3600);
    digits::<2>(&mut b[14..], sod / 60 % 60);
    digits::<2>(&mut b[17..], sod % 60);
    digits::<9>(&mut b[20..], nanos);
    b
}

/// The timestamp as a `String`.
pub(crate) fn string(t: SystemTime) -> String {
    // Only ASCII digits and separators are written.
    String::from_utf8_lossy(&format(t)).into_owned()
}

/// Appends the timestamp, quoted, as a JSON string.
pub(crate) fn push_quoted(out: &mut Vec<u8>, t: SystemTime) {
    let b = format(t);
    let mut q = [b'"'; LEN + 2];
    q[1..=LEN].copy_from_slice(&b);
    out.extend_from_slice(&q);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn known_instants() {
        let at = |s: u64, n: u32| UNIX_EPOCH + Duration::new(s, n);
        assert_eq!(string(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            string(at(1_795_947_330, 123_456_789)),
            "2026-11-29T10:15:30.123456789Z"
        );
        assert_eq!(string(at(951_782_400, 0)), "2000-02-29T00:00:00.000000000Z");
        assert_eq!(
            string(UNIX_EPOCH - Duration::from_nanos(1)),
            "1969-12-31T23:59:59.999999999Z"
        );
        assert_eq!(
            string(UNIX_EPOCH - Duration::from_secs(86_400 * 365 * 3000)),
            "0000-01-01T00:00:00.000000000Z"
        );
        assert_eq!(
            string(UNIX_EPOCH + Duration::from_secs(400_000_000_000)),
            "9999-12-31T23:59:59.999999999Z"
        );
        let mut out = Vec::new();
        push_quoted(&mut out, UNIX_EPOCH);
        assert_eq!(out, b"\"1970-01-01T00:00:00.000000000Z\"");
    }

    proptest! {
        /// Equal to humantime's RFC 3339 (nanoseconds) wherever humantime can write the time.
        #[test]
        fn equals_humantime_from_1970_to_9999(secs in 0u64..253_402_300_800, nanos in 0u32..1_000_000_000) {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            prop_assert_eq!(string(t), humantime::format_rfc3339_nanos(t).to_string());
        }

        /// Before 1970 it counts back one second at a time like any other second.
        #[test]
        fn before_1970_is_continuous(secs in 1u64..62_167_219_199, nanos in 0u32..1_000_000_000) {
            let t = UNIX_EPOCH - Duration::new(secs, nanos);
            let next = t + Duration::from_secs(1);
            let (a, b) = (split(t), split(next));
            prop_assert_eq!(b.0 - a.0, 1);
            prop_assert_eq!(a.1, b.1);
            prop_assert!(string(t) < string(next));
        }
    }
}
