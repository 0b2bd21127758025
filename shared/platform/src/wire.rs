//! Conversions between domain values and the wire's well-known types, written once for
//! every service.

use time::OffsetDateTime;

/// A point in time as a `google.protobuf.Timestamp`.
pub fn timestamp(at: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_seconds_and_nanoseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789).unwrap();
        let ts = timestamp(at);
        assert_eq!((ts.seconds, ts.nanos), (1_800_000_000, 123_456_789));
    }
}
