//! The hash chain: what each event's hash covers, and how a stored chain is checked.
//!
//! Per tenant, events are numbered from 1. Each stores the previous event's hash (32 zero
//! bytes before the first) and its own:
//!
//! ```text
//! payload_digest = SHA-256("penny.audit.v1.payload" ‖ salt ‖ user_id ‖ ip ‖ user_agent ‖ path ‖ attributes)
//! hash           = SHA-256("penny.audit.v1.event" ‖ prev_hash ‖ record fields ‖ payload_digest)
//! ```
//!
//! Every string is written as its byte length (8 bytes, big-endian) and its bytes, every
//! number as 8 big-endian bytes, and attributes as their count and then each key and value
//! in key order, so no two different events encode alike. The personal payload enters the
//! chain only through its digest: redaction deletes the payload (and its random 16-byte
//! salt, so the digest of a low-entropy value such as an IP address cannot be confirmed by
//! guessing) and every hash still verifies.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first event of a chain.
pub const GENESIS: Hash = [0; 32];

/// Length of the random salt mixed into each payload digest.
pub const SALT_LEN: usize = 16;

/// The action of the event that records a redaction. Its `resource_id` is
/// [`redaction_digest`] of the sequence numbers it redacted.
pub const REDACT_ACTION: &str = "audit.redact";

/// The digest naming a set of redacted events in their `audit.redact` event: SHA-256
/// over the sequence numbers, 8 big-endian bytes each, ascending, as lowercase hex.
pub fn redaction_digest(sequences: &[u64]) -> String {
    let mut hasher = Sha256::new();
    for sequence in sequences {
        hasher.update(sequence.to_be_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fields the chain covers directly: nothing personal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The tenant whose chain this is.
    pub tenant_id: Uuid,
    /// Position in the chain, from 1.
    pub sequence: u64,
    /// The producer's event id (the idempotency key).
    pub event_id: Uuid,
    /// The producing service, as the producer named it.
    pub service: String,
    /// The id of the authenticated principal that appended the event (a service
    /// client), set by audit: who vouches for it.
    pub producer_id: String,
    /// What was done (`auth.login`).
    pub action: String,
    /// The resource type.
    pub resource: String,
    /// The resource id.
    pub resource_id: String,
    /// `penny.common.v1.PrincipalKind` of the actor.
    pub principal_kind: i32,
    /// `penny.audit.v1.Outcome`.
    pub outcome: i32,
    /// The gRPC or HTTP method.
    pub method: String,
    /// How long the call took, in microseconds.
    pub duration_micros: i64,
    /// The gRPC or HTTP status.
    pub status: i32,
    /// The W3C trace id, or empty.
    pub trace_id: String,
    /// When it happened, in microseconds since the Unix epoch.
    pub event_time_micros: i64,
    /// When audit stored it, in microseconds since the Unix epoch.
    pub receive_time_micros: i64,
}

/// The personal part of an event: what redaction removes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    /// The acting principal's id, or empty.
    pub user_id: String,
    /// The end user's IP address, or empty.
    pub ip_address: String,
    /// The end user's user agent, or empty.
    pub user_agent: String,
    /// The HTTP path, or empty.
    pub path: String,
    /// Extra details.
    pub attributes: BTreeMap<String, String>,
}

struct Canonical(Sha256);

impl Canonical {
    fn new(domain: &str) -> Self {
        let mut canonical = Self(Sha256::new());
        canonical.str(domain);
        canonical
    }

    fn bytes(&mut self, value: &[u8]) {
        self.0.update((value.len() as u64).to_be_bytes());
        self.0.update(value);
    }

    fn str(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.0.update(value.to_be_bytes());
    }

    fn i64(&mut self, value: i64) {
        self.0.update(value.to_be_bytes());
    }

    fn finish(self) -> Hash {
        self.0.finalize().into()
    }
}

/// The digest of a payload under its salt.
pub fn payload_digest(salt: &[u8; SALT_LEN], payload: &Payload) -> Hash {
    let mut c = Canonical::new("penny.audit.v1.payload");
    c.bytes(salt);
    c.str(&payload.user_id);
    c.str(&payload.ip_address);
    c.str(&payload.user_agent);
    c.str(&payload.path);
    c.u64(payload.attributes.len() as u64);
    for (key, value) in &payload.attributes {
        c.str(key);
        c.str(value);
    }
    c.finish()
}

/// The chain hash of an event.
pub fn event_hash(prev_hash: &Hash, record: &Record, payload_digest: &Hash) -> Hash {
    let mut c = Canonical::new("penny.audit.v1.event");
    c.bytes(prev_hash);
    c.bytes(record.tenant_id.as_bytes());
    c.u64(record.sequence);
    c.bytes(record.event_id.as_bytes());
    c.str(&record.service);
    c.str(&record.producer_id);
    c.str(&record.action);
    c.str(&record.resource);
    c.str(&record.resource_id);
    c.i64(i64::from(record.principal_kind));
    c.i64(i64::from(record.outcome));
    c.str(&record.method);
    c.i64(record.duration_micros);
    c.i64(i64::from(record.status));
    c.str(&record.trace_id);
    c.i64(record.event_time_micros);
    c.i64(record.receive_time_micros);
    c.bytes(payload_digest);
    c.finish()
}

/// One event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The covered fields.
    pub record: Record,
    /// The previous event's hash, as stored.
    pub prev_hash: Hash,
    /// The payload digest, as stored.
    pub payload_digest: Hash,
    /// This event's hash, as stored.
    pub hash: Hash,
    /// The payload and its salt; `None` once redacted (or deleted).
    pub payload: Option<([u8; SALT_LEN], Payload)>,
    /// When the payload was redacted, in microseconds since the Unix epoch, and by which
    /// event of the chain (the `audit.redact` event that recorded it).
    pub redaction: Option<(i64, u64)>,
}

/// What a check found wrong (`penny.audit.v1.ChainFailure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The recomputed hash differs from the stored one: the event was edited.
    HashMismatch,
    /// `prev_hash` differs from the previous event's hash: inserted, deleted or reordered.
    PrevHashMismatch,
    /// A sequence number is missing or repeated.
    SequenceGap,
    /// The chain ends before, or differs from, a recorded head or checkpoint.
    CheckpointMismatch,
    /// A checkpoint's signature does not verify under a trusted key.
    CheckpointSignatureInvalid,
    /// A payload is gone without a redaction recorded in the chain.
    RedactionInvalid,
}

/// Where and how a chain failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The first bad sequence number.
    pub sequence: u64,
    /// What was wrong.
    pub failure: Failure,
    /// For people.
    pub message: String,
}

/// Checks events one at a time, in sequence order, from wherever the check starts.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    expected: u64,
    prev_hash: Hash,
    verified: u64,
    /// Redacted sequences seen, by the sequence of the event that says it redacted them.
    pending: HashMap<u64, Vec<u64>>,
    /// Whether the check started at the first event (so it sees every redaction).
    from_start: bool,
}

impl ChainCheck {
    /// A check starting at `sequence`, whose previous event's hash is `prev_hash`
    /// ([`GENESIS`] at sequence 1).
    pub fn starting_at(sequence: u64, prev_hash: Hash) -> Self {
        Self {
            expected: sequence,
            prev_hash,
            verified: 0,
            pending: HashMap::new(),
            from_start: sequence == 1,
        }
    }

    /// The next sequence number the check expects.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Events verified so far.
    pub fn verified(&self) -> u64 {
        self.verified
    }

    /// The hash of the last verified event (the start's `prev_hash` before any).
    pub fn last_hash(&self) -> Hash {
        self.prev_hash
    }

    /// Checks the next event.
    pub fn next(&mut self, event: &StoredEvent) -> Result<(), Broken> {
        let sequence = event.record.sequence;
        if sequence != self.expected {
            let (at, message) = if sequence > self.expected {
                (self.expected, format!("event {} is missing", self.expected))
            } else {
                (sequence, format!("event {sequence} appears out of order"))
            };
            return Err(Broken {
                sequence: at,
                failure: Failure::SequenceGap,
                message,
            });
        }
        if event.prev_hash != self.prev_hash {
            return Err(Broken {
                sequence,
                failure: Failure::PrevHashMismatch,
                message: format!(
                    "event {sequence} does not follow the event before it (inserted, deleted or reordered)"
                ),
            });
        }
        if event_hash(&event.prev_hash, &event.record, &event.payload_digest) != event.hash {
            return Err(Broken {
                sequence,
                failure: Failure::HashMismatch,
                message: format!("event {sequence} was changed after it was written"),
            });
        }
        match (&event.payload, event.redaction) {
            (Some(_), Some(_)) => {
                return Err(Broken {
                    sequence,
                    failure: Failure::RedactionInvalid,
                    message: format!(
                        "the personal payload of event {sequence} is present although it was redacted"
                    ),
                });
            }
            (Some((salt, payload)), None) => {
                if payload_digest(salt, payload) != event.payload_digest {
                    return Err(Broken {
                        sequence,
                        failure: Failure::HashMismatch,
                        message: format!(
                            "the personal payload of event {sequence} was changed after it was written"
                        ),
                    });
                }
            }
            (None, Some((_, by))) if by > sequence => {
                self.pending.entry(by).or_default().push(sequence);
            }
            (None, _) => {
                return Err(Broken {
                    sequence,
                    failure: Failure::RedactionInvalid,
                    message: format!(
                        "the personal payload of event {sequence} is gone without a recorded redaction"
                    ),
                });
            }
        }
        // The event that claims earlier redactions must be a redaction naming exactly them.
        if let Some(redacted) = self.pending.remove(&sequence) {
            let first = redacted.first().copied().unwrap_or(sequence);
            if event.record.action != REDACT_ACTION
                || (self.from_start && event.record.resource_id != redaction_digest(&redacted))
            {
                return Err(Broken {
                    sequence: first,
                    failure: Failure::RedactionInvalid,
                    message: format!(
                        "the redaction of event {first} is not the one event {sequence} records"
                    ),
                });
            }
        }
        self.prev_hash = event.hash;
        self.expected = sequence + 1;
        self.verified += 1;
        Ok(())
    }

    /// A redaction seen so far that no event of the chain recorded: after the whole
    /// chain, a payload deleted and a redaction row forged for it.
    pub fn unrecorded_redaction(&self) -> Option<Broken> {
        let (by, first) = self
            .pending
            .iter()
            .filter_map(|(by, redacted)| redacted.first().map(|first| (*by, *first)))
            .min_by_key(|(_, first)| *first)?;
        Some(Broken {
            sequence: first,
            failure: Failure::RedactionInvalid,
            message: format!(
                "the redaction of event {first} names event {by}, which does not record it"
            ),
        })
    }

    /// Ends the check against the recorded head (`head_sequence`, `head_hash`): a chain
    /// that stops short of it, or ends elsewhere, lost its tail; a redaction no event
    /// recorded is forged.
    pub fn finish_at_head(&self, head_sequence: u64, head_hash: &Hash) -> Result<(), Broken> {
        if let Some(broken) = self.unrecorded_redaction() {
            return Err(broken);
        }
        let last = self.expected - 1;
        if last < head_sequence {
            return Err(Broken {
                sequence: self.expected,
                failure: Failure::CheckpointMismatch,
                message: format!(
                    "the chain ends at event {last} but reached event {head_sequence} (its tail is gone)"
                ),
            });
        }
        if last == head_sequence && self.prev_hash != *head_hash {
            return Err(Broken {
                sequence: last,
                failure: Failure::CheckpointMismatch,
                message: format!("event {last} differs from the recorded head of the chain"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence: u64) -> Record {
        Record {
            tenant_id: Uuid::from_u128(7),
            sequence,
            event_id: Uuid::from_u128(u128::from(sequence)),
            service: "auth".into(),
            producer_id: "svc".into(),
            action: "auth.login".into(),
            resource: "session".into(),
            resource_id: String::new(),
            principal_kind: 1,
            outcome: 1,
            method: "/penny.auth.v1.AuthService/Login".into(),
            duration_micros: 1500,
            status: 0,
            trace_id: String::new(),
            event_time_micros: 1_700_000_000_000_000,
            receive_time_micros: 1_700_000_000_000_100,
        }
    }

    fn chain(n: u64) -> Vec<StoredEvent> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|sequence| {
                let salt = [sequence as u8; SALT_LEN];
                let payload = Payload {
                    user_id: Uuid::from_u128(99).to_string(),
                    ip_address: "203.0.113.7".into(),
                    ..Payload::default()
                };
                let digest = payload_digest(&salt, &payload);
                let record = record(sequence);
                let hash = event_hash(&prev, &record, &digest);
                let event = StoredEvent {
                    record,
                    prev_hash: prev,
                    payload_digest: digest,
                    hash,
                    payload: Some((salt, payload)),
                    redaction: None,
                };
                prev = hash;
                event
            })
            .collect()
    }

    fn check(events: &[StoredEvent]) -> Result<ChainCheck, Broken> {
        let mut check = ChainCheck::starting_at(1, GENESIS);
        for event in events {
            check.next(event)?;
        }
        Ok(check)
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let events = chain(5);
        let done = check(&events).unwrap();
        assert_eq!(done.verified(), 5);
        done.finish_at_head(5, &events[4].hash).unwrap();
    }

    #[test]
    fn an_edited_field_is_found_at_its_event() {
        let mut events = chain(5);
        events[2].record.action = "auth.logout".into();
        let broken = check(&events).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (3, Failure::HashMismatch)
        );
    }

    #[test]
    fn an_edited_payload_is_found_at_its_event() {
        let mut events = chain(5);
        if let Some((_, payload)) = &mut events[3].payload {
            payload.ip_address = "198.51.100.1".into();
        }
        let broken = check(&events).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (4, Failure::HashMismatch)
        );
    }

    #[test]
    fn a_deleted_event_is_a_gap_at_its_number() {
        let mut events = chain(5);
        events.remove(1);
        let broken = check(&events).unwrap_err();
        assert_eq!((broken.sequence, broken.failure), (2, Failure::SequenceGap));
    }

    #[test]
    fn reordered_events_break_at_the_first_moved_one() {
        let mut events = chain(5);
        // Swap the contents of 2 and 3 but keep the numbering.
        let (a, b) = (events[1].clone(), events[2].clone());
        events[1] = StoredEvent {
            record: Record {
                sequence: 2,
                ..b.record.clone()
            },
            ..b
        };
        events[2] = StoredEvent {
            record: Record {
                sequence: 3,
                ..a.record.clone()
            },
            ..a
        };
        let broken = check(&events).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (2, Failure::PrevHashMismatch)
        );
    }

    #[test]
    fn an_inserted_event_breaks_where_it_was_put() {
        let mut events = chain(5);
        let mut forged = events[1].clone();
        forged.record.event_id = Uuid::from_u128(1234);
        forged.hash = event_hash(&forged.prev_hash, &forged.record, &forged.payload_digest);
        // Put in at 3, renumbering the rest.
        events.insert(2, forged);
        for (i, event) in events.iter_mut().enumerate() {
            event.record.sequence = i as u64 + 1;
        }
        let broken = check(&events).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (3, Failure::PrevHashMismatch)
        );
    }

    #[test]
    fn a_dropped_tail_is_found_against_the_head() {
        let events = chain(5);
        let done = check(&events[..3]).unwrap();
        let broken = done.finish_at_head(5, &events[4].hash).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (4, Failure::CheckpointMismatch)
        );
    }

    #[test]
    fn a_redacted_payload_verifies_and_a_vanished_one_does_not() {
        let mut events = chain(5);
        // Event 6 records the redaction of event 2.
        let mut record = record(6);
        record.action = REDACT_ACTION.into();
        record.resource_id = redaction_digest(&[2]);
        let digest = payload_digest(&[0; SALT_LEN], &Payload::default());
        let hash = event_hash(&events[4].hash, &record, &digest);
        events.push(StoredEvent {
            record,
            prev_hash: events[4].hash,
            payload_digest: digest,
            hash,
            payload: Some(([0; SALT_LEN], Payload::default())),
            redaction: None,
        });
        events[1].payload = None;
        events[1].redaction = Some((1, 6));
        check(&events).unwrap();
        // Claimed by an event that is not the redaction of exactly it: refused.
        events[1].redaction = Some((1, 5));
        let broken = check(&events).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (2, Failure::RedactionInvalid)
        );
        events[1].redaction = Some((1, 6));
        // A redaction row claiming an event that does not exist, for a deleted payload.
        let mut forged = events.clone();
        forged[3].payload = None;
        forged[3].redaction = Some((1, 9_000));
        let done = check(&forged).unwrap();
        let broken = done.finish_at_head(6, &forged[5].hash).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (4, Failure::RedactionInvalid)
        );
        // A payload put back after its redaction.
        let mut restored = events.clone();
        restored[1].payload = events[2].payload.clone();
        let broken = check(&restored).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (2, Failure::RedactionInvalid)
        );
        events[2].payload = None;
        let broken = check(&events).unwrap_err();
        assert_eq!(
            (broken.sequence, broken.failure),
            (3, Failure::RedactionInvalid)
        );
    }

    #[test]
    fn the_digest_depends_on_the_salt_and_on_every_field() {
        let payload = Payload {
            user_id: "u".into(),
            attributes: BTreeMap::from([("a".into(), "b".into())]),
            ..Payload::default()
        };
        let base = payload_digest(&[0; SALT_LEN], &payload);
        assert_ne!(base, payload_digest(&[1; SALT_LEN], &payload));
        // Moving a byte between fields changes the encoding.
        let shifted = Payload {
            user_id: String::new(),
            ip_address: "u".into(),
            ..payload.clone()
        };
        assert_ne!(base, payload_digest(&[0; SALT_LEN], &shifted));
    }
}
