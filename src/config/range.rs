//! The one check of every numeric key: within its allowed range, or an error of one wording
//! that names the range, never the value found (a value typed in the wrong place may be a
//! secret).

use std::fmt::Display;
use std::ops::{Bound, RangeBounds};
use std::time::Duration;

use super::error::Invalid;

/// `value` if `allowed` contains it; else an error at `key` saying what is allowed, e.g.
/// "out of range: at least 1 and at most 4096". `allowed` is `min..=max`, or
/// `(Bound::Excluded(min), Bound::Included(max))` for a lower bound that is not allowed
/// itself (rates, which must be more than 0). NaN is in no range.
pub(crate) fn check<T, R>(key: &str, value: T, allowed: R) -> Result<T, Invalid>
where
    T: PartialOrd + Display,
    R: RangeBounds<T>,
{
    if allowed.contains(&value) {
        Ok(value)
    } else {
        Err(Invalid::new(key, message(&allowed)))
    }
}

/// [`check`] of a number of seconds, as a duration.
pub(crate) fn secs(
    key: &str,
    value: u64,
    allowed: impl RangeBounds<u64>,
) -> Result<Duration, Invalid> {
    check(key, value, allowed).map(Duration::from_secs)
}

/// What `allowed` allows, in words (its bounds come from the program, not the file).
fn message<T: Display>(allowed: &impl RangeBounds<T>) -> String {
    let low = match allowed.start_bound() {
        Bound::Included(min) => Some(format!("at least {min}")),
        Bound::Excluded(min) => Some(format!("more than {min}")),
        Bound::Unbounded => None,
    };
    let high = match allowed.end_bound() {
        Bound::Included(max) => Some(format!("at most {max}")),
        Bound::Excluded(max) => Some(format!("less than {max}")),
        Bound::Unbounded => None,
    };
    let what = match (low, high) {
        (Some(l), Some(h)) => format!("{l} and {h}"),
        (Some(b), None) | (None, Some(b)) => b,
        (None, None) => "anything".to_owned(),
    };
    format!("out of range: must be {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_is_the_value_itself() {
        assert_eq!(check("k", 5u64, 1..=10), Ok(5));
        assert_eq!(check("k", 1usize, 1..=10), Ok(1));
        assert_eq!(check("k", 10.0, 1.0..=10.0), Ok(10.0));
        assert_eq!(secs("k", 7, 1..=3600), Ok(Duration::from_secs(7)));
        let rate = (Bound::Excluded(0.0), Bound::Included(1e6));
        assert_eq!(check("k", 1e-300, rate), Ok(1e-300));
        assert_eq!(check("k", 1e6, rate), Ok(1e6));
    }

    #[test]
    fn one_wording_that_names_the_range_and_the_key() {
        let e = check("proxy.max_resources", 0usize, 1..=4096).unwrap_err();
        assert_eq!(e.key, "proxy.max_resources");
        assert_eq!(
            e.reason,
            "out of range: must be at least 1 and at most 4096"
        );
        let e = secs("keys.reload_interval_secs", 0, 1..=3600).unwrap_err();
        assert_eq!(
            e.reason,
            "out of range: must be at least 1 and at most 3600"
        );
        let e = check("limits.rate_burst", 0.5, 1.0..=1e6).unwrap_err();
        assert_eq!(
            e.reason,
            "out of range: must be at least 1 and at most 1000000"
        );
        let rate = (Bound::Excluded(0.0), Bound::Included(1e6));
        let e = check("limits.rate_per_sender", 0.0, rate).unwrap_err();
        assert_eq!(
            e.reason,
            "out of range: must be more than 0 and at most 1000000"
        );
        assert_eq!(
            check("k", 5u64, ..5).unwrap_err().reason,
            "out of range: must be less than 5"
        );
    }

    #[test]
    fn no_value_is_echoed() {
        // The same message whatever the value: nothing of it can show.
        for value in [7654321u64, 0, u64::MAX] {
            let e = check("k", value, 1..=1000).unwrap_err();
            assert_eq!(
                e.reason,
                "out of range: must be at least 1 and at most 1000"
            );
        }
        let e = check("k", 7654321usize, 1..=1000).unwrap_err();
        assert!(!e.reason.contains("7654321"), "{e:?}");
        let rate = (Bound::Excluded(0.0), Bound::Included(1e6));
        for value in [
            7654321.5,
            -7654321.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let e = check("k", value, rate).unwrap_err();
            assert_eq!(
                e.reason,
                "out of range: must be more than 0 and at most 1000000"
            );
            let e = check("k", value, 1.0..=1e6).unwrap_err();
            assert_eq!(
                e.reason,
                "out of range: must be at least 1 and at most 1000000"
            );
        }
    }
}
