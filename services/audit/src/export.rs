//! The export format: one event per line in the proto3 JSON mapping of
//! `penny.audit.v1.AuditEvent` (output-only fields included), and its reading back, so an
//! export can be verified offline (`penny audit verify`) with the same chain rules.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::chain::{Hash, Payload, Record, SALT_LEN, StoredEvent};
use penny_proto::audit::v1 as pb;
use penny_proto::common::v1::PrincipalKind as PbKind;

fn rfc3339(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn micros_of(text: &str) -> Option<i64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1000).ok()
}

/// One event as a JSON line (with its `\n`).
pub fn json_line(event: &StoredEvent) -> String {
    let r = &event.record;
    let payload = event.payload.as_ref();
    let personal = |f: fn(&Payload) -> &str| payload.map_or("", |(_, p)| f(p)).to_owned();
    let mut value = json!({
        "id": r.event_id.to_string(),
        "tenantId": r.tenant_id.to_string(),
        "userId": personal(|p| &p.user_id),
        "principalKind": PbKind::try_from(r.principal_kind)
            .map_or("PRINCIPAL_KIND_UNSPECIFIED", |k| k.as_str_name()),
        "action": r.action,
        "resource": r.resource,
        "resourceId": r.resource_id,
        "metadata": {
            "method": r.method,
            "path": personal(|p| &p.path),
            "duration": format!("{}.{:06}s", r.duration_micros / 1_000_000, r.duration_micros % 1_000_000),
            "status": r.status,
        },
        "ipAddress": personal(|p| &p.ip_address),
        "userAgent": personal(|p| &p.user_agent),
        "eventTime": rfc3339(r.event_time_micros),
        "service": r.service,
        "producerId": r.producer_id,
        "outcome": pb::Outcome::try_from(r.outcome)
            .map_or("OUTCOME_UNSPECIFIED", |o| o.as_str_name()),
        "traceId": r.trace_id,
        "attributes": payload.map(|(_, p)| p.attributes.clone()).unwrap_or_default(),
        "sequence": r.sequence.to_string(),
        "prevHash": STANDARD.encode(event.prev_hash),
        "payloadDigest": STANDARD.encode(event.payload_digest),
        "hash": STANDARD.encode(event.hash),
        "receiveTime": rfc3339(r.receive_time_micros),
        "payloadSalt": payload.map(|(salt, _)| STANDARD.encode(salt)).unwrap_or_default(),
    });
    if let (Some((at, by)), Value::Object(map)) = (event.redaction, &mut value) {
        map.insert("redactTime".into(), Value::String(rfc3339(at)));
        // Not in the proto: which `audit.redact` event recorded it, for offline checks.
        map.insert("redactionSequence".into(), Value::String(by.to_string()));
    }
    let mut line = value.to_string();
    line.push('\n');
    line
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LineError(pub String);

fn field<'a>(value: &'a Value, name: &str) -> Result<&'a Value, LineError> {
    value
        .get(name)
        .ok_or_else(|| LineError(format!("missing {name}")))
}

fn text(value: &Value, name: &str) -> Result<String, LineError> {
    field(value, name)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| LineError(format!("{name} is not a string")))
}

fn number(value: &Value, name: &str) -> Result<u64, LineError> {
    text(value, name)?
        .parse()
        .map_err(|_| LineError(format!("{name} is not a number")))
}

fn time_of(value: &Value, name: &str) -> Result<i64, LineError> {
    micros_of(&text(value, name)?).ok_or_else(|| LineError(format!("{name} is not a time")))
}

fn hash(value: &Value, name: &str) -> Result<Hash, LineError> {
    STANDARD
        .decode(text(value, name)?)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| LineError(format!("{name} is not 32 bytes of base64")))
}

fn duration_micros(text: &str) -> Option<i64> {
    let (seconds, fraction) = text.strip_suffix('s')?.split_once('.')?;
    let micros: i64 = format!("{fraction:0<6}").get(..6)?.parse().ok()?;
    Some(seconds.parse::<i64>().ok()? * 1_000_000 + micros)
}

/// Reads one line of an export back into the stored form.
pub fn parse_line(line: &str) -> Result<StoredEvent, LineError> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| LineError(format!("not JSON: {e}")))?;
    let metadata = field(&value, "metadata")?;
    let uuid = |name: &str| {
        Uuid::try_parse(&text(&value, name)?)
            .map_err(|_| LineError(format!("{name} is not a UUID")))
    };
    let record = Record {
        tenant_id: uuid("tenantId")?,
        sequence: number(&value, "sequence")?,
        event_id: uuid("id")?,
        service: text(&value, "service")?,
        producer_id: text(&value, "producerId")?,
        action: text(&value, "action")?,
        resource: text(&value, "resource")?,
        resource_id: text(&value, "resourceId")?,
        principal_kind: PbKind::from_str_name(&text(&value, "principalKind")?)
            .ok_or_else(|| LineError("principalKind is unknown".into()))?
            as i32,
        outcome: pb::Outcome::from_str_name(&text(&value, "outcome")?)
            .ok_or_else(|| LineError("outcome is unknown".into()))? as i32,
        method: text(metadata, "method")?,
        duration_micros: duration_micros(&text(metadata, "duration")?)
            .ok_or_else(|| LineError("metadata.duration is not a duration".into()))?,
        status: field(metadata, "status")?
            .as_i64()
            .and_then(|s| i32::try_from(s).ok())
            .ok_or_else(|| LineError("metadata.status is not a number".into()))?,
        trace_id: text(&value, "traceId")?,
        event_time_micros: time_of(&value, "eventTime")?,
        receive_time_micros: time_of(&value, "receiveTime")?,
    };
    let salt = text(&value, "payloadSalt")?;
    let payload = if salt.is_empty() {
        None
    } else {
        let salt: [u8; SALT_LEN] = STANDARD
            .decode(salt)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| LineError("payloadSalt is not 16 bytes of base64".into()))?;
        let attributes: BTreeMap<String, String> =
            serde_json::from_value(field(&value, "attributes")?.clone())
                .map_err(|_| LineError("attributes is not a map of strings".into()))?;
        Some((
            salt,
            Payload {
                user_id: text(&value, "userId")?,
                ip_address: text(&value, "ipAddress")?,
                user_agent: text(&value, "userAgent")?,
                path: text(metadata, "path")?,
                attributes,
            },
        ))
    };
    let redaction = match value.get("redactTime") {
        Some(_) => Some((
            time_of(&value, "redactTime")?,
            number(&value, "redactionSequence")?,
        )),
        None => None,
    };
    Ok(StoredEvent {
        record,
        prev_hash: hash(&value, "prevHash")?,
        payload_digest: hash(&value, "payloadDigest")?,
        hash: hash(&value, "hash")?,
        payload,
        redaction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_back_exactly() {
        let event = StoredEvent {
            record: Record {
                tenant_id: Uuid::from_u128(1),
                sequence: 42,
                event_id: Uuid::from_u128(2),
                service: "auth".into(),
                producer_id: "svc-1".into(),
                action: "auth.login".into(),
                resource: "session".into(),
                resource_id: "x".into(),
                principal_kind: 1,
                outcome: 2,
                method: "/penny.auth.v1.AuthService/Login".into(),
                duration_micros: 1_234_567,
                status: 16,
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                event_time_micros: 1_764_900_000_123_456,
                receive_time_micros: 1_764_900_000_223_456,
            },
            prev_hash: [3; 32],
            payload_digest: [4; 32],
            hash: [5; 32],
            payload: Some((
                [6; SALT_LEN],
                Payload {
                    user_id: Uuid::from_u128(9).to_string(),
                    ip_address: "2001:db8::1".into(),
                    user_agent: "curl/8 \"quoted\"\n".into(),
                    path: String::new(),
                    attributes: BTreeMap::from([("k".into(), "v".into())]),
                },
            )),
            redaction: None,
        };
        let line = json_line(&event);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert_eq!(parse_line(line.trim_end()).unwrap(), event);
        let redacted = StoredEvent {
            payload: None,
            redaction: Some((1_764_900_001_000_000, 50)),
            ..event
        };
        assert_eq!(parse_line(&json_line(&redacted)).unwrap(), redacted);
    }
}
