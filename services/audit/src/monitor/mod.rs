//! The security monitor: rules evaluated on every newly stored event, with their state in
//! the audit database so that several audit replicas count together; alerts stored,
//! listed, streamed and acknowledged; actions carried out by auth and tenants.
//!
//! Counting: a threshold rule adds each batch's matching events to per-key buckets
//! (1/30 of its window) in one committed statement, then sums the key's buckets over the
//! window in another. Whichever replica sums last sees every increment, so the threshold
//! holds across replicas; a window is counted to within one bucket (never short). A
//! rule fires at most once per key and window: the firing row is claimed with one
//! conditional upsert, which only one replica wins.

pub mod rules;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use penny_platform::db::{Sql, begin_platform};
use penny_platform::principal::PLATFORM_TENANT_ID;
use penny_platform::{Authorizer, Principal};
use penny_proto::audit::v1 as pb;
use penny_proto::auth::v1::auth_service_client::AuthServiceClient;
use penny_proto::tenants::v1::tenant_service_client::TenantServiceClient;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult};
use tokio::sync::{Notify, broadcast};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::chain::{Payload, Record};
use crate::store::{NewEvent, Store, now_micros};
use rules::{KeyKind, Kind, Rule, RuleSet, network_of};

/// Event ids kept on one alert.
const MAX_ALERT_EVENTS: usize = 100;
/// Times an action is tried before it is left FAILED.
pub const MAX_ATTEMPTS: i32 = 10;
/// How long one replica holds an action it is carrying out before another may retry it.
const CLAIM: Duration = Duration::from_secs(30);
/// How often the alert feed looks for changes, and how far back (clock skew between
/// replicas).
const FEED_POLL: Duration = Duration::from_millis(250);
const FEED_LOOKBACK_MICROS: i64 = 5_000_000;
/// Alerts read per poll of the feed.
const FEED_PAGE: usize = 1000;
/// Alerts a watcher may fall behind by before its stream ends.
const FEED_CAPACITY: usize = 1024;
/// Actions of the monitor's own events, which it never counts.
const OWN_ACTIONS: &str = "audit.alert";
/// How long counters are kept past the longest window.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where the monitor's actions are carried out.
#[derive(Clone, Default)]
pub struct Enforcers {
    /// Auth, for BLOCK_IP.
    pub auth: Option<Channel>,
    /// Tenants, for SUSPEND_USER.
    pub tenants: Option<Channel>,
    /// Gives requests audit's own service credential.
    pub credential: Option<Authorizer>,
}

impl std::fmt::Debug for Enforcers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcers")
            .field("auth", &self.auth.is_some())
            .field("tenants", &self.tenants.is_some())
            .finish_non_exhaustive()
    }
}

/// The monitor. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: DatabaseConnection,
    store: Store,
    rules: RuleSet,
    enforcers: Enforcers,
    /// Wakes the action executor.
    wake: Notify,
    /// Alerts as they are raised or change, from every replica.
    feed: broadcast::Sender<Arc<pb::Alert>>,
}

/// An event the monitor looks at.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// Its chain.
    pub tenant: Uuid,
    /// Its covered fields.
    pub record: &'a Record,
    /// Its personal part.
    pub payload: &'a Payload,
}

/// Filters of [`Monitor::list`].
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// Only this tenant's.
    pub tenant: Option<Uuid>,
    /// Only in this state.
    pub state: Option<i32>,
    /// Only at least this severe.
    pub min_severity: Option<i32>,
    /// Created at or after (microseconds).
    pub start_micros: Option<i64>,
    /// Created before (microseconds).
    pub end_micros: Option<i64>,
}

const ALERT_COLUMNS: &str = "id, tenant_id, rule, severity, key_kind, key, message, event_ids, \
     action, action_status, action_error, state, create_micros, ack_micros, ack_principal_id, \
     ack_note, revision, update_micros, attempts, next_attempt_micros";

/// A stored alert and the bookkeeping around it.
#[derive(Debug, Clone)]
struct Stored {
    alert: pb::Alert,
    revision: i64,
    update_micros: i64,
    attempts: i32,
    next_attempt_micros: i64,
}

fn read_alert(row: &QueryResult) -> Result<Stored, DbErr> {
    let id: Uuid = row.try_get_by_index(0)?;
    let tenant: Uuid = row.try_get_by_index(1)?;
    let event_ids: String = row.try_get_by_index(7)?;
    let ack_micros: Option<i64> = row.try_get_by_index(13)?;
    let alert = pb::Alert {
        id: id.to_string(),
        tenant_id: tenant.to_string(),
        rule: row.try_get_by_index(2)?,
        severity: row.try_get_by_index(3)?,
        key_kind: row.try_get_by_index(4)?,
        key: row.try_get_by_index(5)?,
        message: row.try_get_by_index(6)?,
        event_ids: serde_json::from_str(&event_ids)
            .map_err(|_| DbErr::Custom("monitor: event_ids is not a JSON list".into()))?,
        action: row.try_get_by_index(8)?,
        action_status: row.try_get_by_index(9)?,
        action_error: row.try_get_by_index(10)?,
        state: row.try_get_by_index(11)?,
        create_time: Some(crate::service::timestamp(row.try_get_by_index(12)?)),
        ack_time: ack_micros.map(crate::service::timestamp),
        ack_principal_id: row.try_get_by_index(14)?,
        ack_note: row.try_get_by_index(15)?,
    };
    Ok(Stored {
        alert,
        revision: row.try_get_by_index(16)?,
        update_micros: row.try_get_by_index(17)?,
        attempts: row.try_get_by_index(18)?,
        next_attempt_micros: row.try_get_by_index(19)?,
    })
}

/// What fired, before it is stored.
struct Firing<'a> {
    rule: &'a Rule,
    tenant: Uuid,
    key: String,
    message: String,
    event_ids: Vec<String>,
}

impl Monitor {
    /// A monitor over the audit database, appending its own events through `store`.
    /// Fails when a rule's action has nowhere to go (auth for BLOCK_IP, tenants for
    /// SUSPEND_USER, and a credential for either), naming the setting.
    pub fn new(
        db: DatabaseConnection,
        store: Store,
        rules: RuleSet,
        enforcers: Enforcers,
    ) -> anyhow::Result<Self> {
        let (auth, tenants) = rules.needs();
        anyhow::ensure!(
            !auth || enforcers.auth.is_some(),
            "a monitor rule blocks IP addresses: PENNY_AUTH_URL is required (or make the rule dry_run)"
        );
        anyhow::ensure!(
            !tenants || enforcers.tenants.is_some(),
            "a monitor rule suspends users: PENNY_AUDIT_TENANTS_URL is required (or make the rule dry_run)"
        );
        anyhow::ensure!(
            !(auth || tenants) || enforcers.credential.is_some(),
            "a monitor rule acts through auth or tenants: audit needs its own credential and PENNY_AUTHZ_URL"
        );
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                store,
                rules,
                enforcers,
                wake: Notify::new(),
                feed,
            }),
        })
    }

    /// The rules in force.
    pub fn rules(&self) -> &RuleSet {
        &self.inner.rules
    }

    fn backend(&self) -> DbBackend {
        self.inner.db.get_database_backend()
    }

    /// Starts the action executor, the alert feed and counter pruning; they stop once
    /// `alive` has no strong reference left.
    pub fn spawn(&self, alive: std::sync::Weak<()>) {
        let executor = self.clone();
        let until = alive.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = executor.inner.wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if until.strong_count() == 0 {
                    return;
                }
                if let Err(err) = executor.run_actions().await {
                    tracing::warn!(error = %err, "monitor actions could not be read; retrying");
                }
            }
        });
        let feed = self.clone();
        let until = alive.clone();
        tokio::spawn(async move { feed.follow(until).await });
        let pruner = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PRUNE_EVERY).await;
                if alive.strong_count() == 0 {
                    return;
                }
                if let Err(err) = pruner.prune().await {
                    tracing::warn!(error = %err, "monitor counters could not be pruned");
                }
            }
        });
    }

    /// Evaluates every rule on events just stored (each seen once: duplicates are not
    /// passed in). The monitor's own `audit.alert*` events are not counted.
    pub async fn observe(&self, events: &[Seen<'_>]) -> Result<(), DbErr> {
        let events: Vec<Seen<'_>> = events
            .iter()
            .copied()
            .filter(|e| !e.record.action.starts_with(OWN_ACTIONS))
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        for rule in &self.inner.rules.rules {
            let matched: Vec<(Seen<'_>, String)> = events
                .iter()
                .filter(|e| rule.matches.matches(e.record, e.payload))
                .filter_map(|e| rule.key_of(e.record, e.payload).map(|key| (*e, key)))
                .collect();
            if matched.is_empty() {
                continue;
            }
            let firings = match rule.kind {
                Kind::Threshold if rule.window_secs == 0 => matched
                    .iter()
                    .map(|(e, key)| Firing {
                        rule,
                        tenant: alert_tenant(rule, e.tenant),
                        key: key.clone(),
                        message: format!(
                            "{}: {} on {} {key}",
                            rule.name,
                            e.record.action,
                            key_name(rule.key)
                        ),
                        event_ids: vec![e.record.event_id.to_string()],
                    })
                    .collect(),
                Kind::Threshold => self.count(rule, &matched).await?,
                Kind::NewNetwork => self.new_networks(rule, &matched).await?,
                Kind::UnusualHour => self.unusual_hours(rule, &matched).await?,
            };
            for firing in firings {
                self.raise(firing).await?;
            }
        }
        Ok(())
    }

    /// Adds a threshold rule's matches to its counters; the keys past the threshold whose
    /// firing this replica won.
    async fn count<'r>(
        &self,
        rule: &'r Rule,
        matched: &[(Seen<'_>, String)],
    ) -> Result<Vec<Firing<'r>>, DbErr> {
        let width = rule.bucket_secs();
        let buckets = i64::try_from(rules::BUCKETS_PER_WINDOW).unwrap_or(30);
        // (counting tenant, key) → (bucket → count, latest event time, event ids).
        type Tally = (BTreeMap<i64, i64>, i64, Vec<String>);
        let mut tallies: BTreeMap<(Uuid, String), Tally> = BTreeMap::new();
        for (e, key) in matched {
            let at = e.record.event_time_micros;
            let entry = tallies
                .entry((alert_tenant(rule, e.tenant), key.clone()))
                .or_default();
            *entry.0.entry(at.div_euclid(1_000_000) / width).or_default() += 1;
            entry.1 = entry.1.max(at);
            if entry.2.len() < MAX_ALERT_EVENTS {
                entry.2.push(e.record.event_id.to_string());
            }
        }
        // Committed before summing (see the module's documentation).
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(
            self.backend(),
            "INSERT INTO monitor_counts (tenant_id, rule, key, bucket, count) VALUES ",
        );
        let mut first = true;
        for ((tenant, key), (counts, _, _)) in &tallies {
            for (bucket, count) in counts {
                if !first {
                    sql.push(", ");
                }
                first = false;
                sql.push("(")
                    .bind(*tenant)
                    .push(", ")
                    .bind(rule.name.clone())
                    .push(", ")
                    .bind(key.clone())
                    .push(", ")
                    .bind(*bucket)
                    .push(", ")
                    .bind(*count)
                    .push(")");
            }
        }
        sql.push(
            " ON CONFLICT (tenant_id, rule, key, bucket) \
             DO UPDATE SET count = monitor_counts.count + excluded.count",
        );
        txn.execute_raw(sql.build()).await?;
        txn.commit().await?;
        // One sum per key over its window, in one statement: the events of one call are
        // one tenant's (or all counted in the platform tenant), and close in time.
        let Some(tenant) = tallies.keys().next().map(|(tenant, _)| *tenant) else {
            return Ok(Vec::new());
        };
        let lasts = tallies
            .values()
            .map(|(_, latest, _)| latest.div_euclid(1_000_000) / width);
        let (low, high) = (
            lasts.clone().min().unwrap_or(0) - buckets,
            lasts.max().unwrap_or(0),
        );
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(
            self.backend(),
            "SELECT key, CAST(SUM(count) AS BIGINT) FROM monitor_counts WHERE tenant_id = ",
        );
        sql.bind(tenant)
            .push(" AND rule = ")
            .bind(rule.name.clone())
            .push(" AND bucket >= ")
            .bind(low)
            .push(" AND bucket <= ")
            .bind(high)
            .push(" AND key IN ")
            .bind_list(tallies.keys().map(|(_, key)| key.clone()))
            .push(" GROUP BY key");
        let mut totals: HashMap<String, i64> = HashMap::new();
        for row in txn.query_all_raw(sql.build()).await? {
            totals.insert(row.try_get_by_index(0)?, row.try_get_by_index(1)?);
        }
        txn.commit().await?;
        let mut firings = Vec::new();
        for ((tenant, key), (_, latest, event_ids)) in tallies {
            let total = totals.get(&key).copied().unwrap_or(0);
            if u64::try_from(total).unwrap_or(0) < rule.threshold {
                continue;
            }
            let until = latest + i64::try_from(rule.window_secs).unwrap_or(0) * 1_000_000;
            if !self.claim_firing(rule, tenant, &key, latest, until).await? {
                continue;
            }
            firings.push(Firing {
                rule,
                tenant,
                message: format!(
                    "{}: {total} matching events by {} {key} within {} s (threshold {})",
                    rule.name,
                    key_name(rule.key),
                    rule.window_secs,
                    rule.threshold
                ),
                key,
                event_ids,
            });
        }
        Ok(firings)
    }

    /// Whether this replica may raise the alert of `rule` for `key` at `at`: true for one
    /// caller per window, whichever replica asks.
    async fn claim_firing(
        &self,
        rule: &Rule,
        tenant: Uuid,
        key: &str,
        at: i64,
        until: i64,
    ) -> Result<bool, DbErr> {
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(
            self.backend(),
            "INSERT INTO monitor_firings (tenant_id, rule, key, until_micros) VALUES (",
        );
        sql.bind(tenant)
            .push(", ")
            .bind(rule.name.clone())
            .push(", ")
            .bind(key.to_owned())
            .push(", ")
            .bind(until)
            .push(
                ") ON CONFLICT (tenant_id, rule, key) DO UPDATE SET until_micros = \
                 excluded.until_micros WHERE monitor_firings.until_micros <= ",
            )
            .bind(at);
        let claimed = txn.execute_raw(sql.build()).await?.rows_affected() == 1;
        txn.commit().await?;
        Ok(claimed)
    }

    /// Sign-ins from a network the user was never seen on (a user's first network is
    /// learnt, not reported).
    async fn new_networks<'r>(
        &self,
        rule: &'r Rule,
        matched: &[(Seen<'_>, String)],
    ) -> Result<Vec<Firing<'r>>, DbErr> {
        let mut firings = Vec::new();
        for (e, user) in matched {
            let Some(network) = network_of(&e.payload.ip_address) else {
                continue;
            };
            let txn = begin_platform(&self.inner.db).await?;
            let mut sql = Sql::new(
                self.backend(),
                "INSERT INTO monitor_networks (tenant_id, user_id, network, first_seen_micros) VALUES (",
            );
            sql.bind(e.tenant)
                .push(", ")
                .bind(user.clone())
                .push(", ")
                .bind(network.clone())
                .push(", ")
                .bind(e.record.event_time_micros)
                .push(") ON CONFLICT (tenant_id, user_id, network) DO NOTHING");
            let new = txn.execute_raw(sql.build()).await?.rows_affected() == 1;
            let known = if new {
                let mut sql = Sql::new(
                    self.backend(),
                    "SELECT CAST(COUNT(*) AS BIGINT) FROM monitor_networks WHERE tenant_id = ",
                );
                sql.bind(e.tenant)
                    .push(" AND user_id = ")
                    .bind(user.clone());
                match txn.query_one_raw(sql.build()).await? {
                    Some(row) => row.try_get_by_index::<i64>(0)?,
                    None => 0,
                }
            } else {
                0
            };
            txn.commit().await?;
            if new && known > 1 {
                firings.push(Firing {
                    rule,
                    tenant: e.tenant,
                    key: user.clone(),
                    message: format!(
                        "{}: user {user} signed in from a new network, {network}",
                        rule.name
                    ),
                    event_ids: vec![e.record.event_id.to_string()],
                });
            }
        }
        Ok(firings)
    }

    /// Sign-ins at an hour (UTC) the user never signs in at, nor the hours beside it,
    /// once the user has `min_history` sign-ins.
    async fn unusual_hours<'r>(
        &self,
        rule: &'r Rule,
        matched: &[(Seen<'_>, String)],
    ) -> Result<Vec<Firing<'r>>, DbErr> {
        let mut firings = Vec::new();
        for (e, user) in matched {
            let hour = e
                .record
                .event_time_micros
                .div_euclid(3_600_000_000)
                .rem_euclid(24);
            let txn = begin_platform(&self.inner.db).await?;
            let mut sql = Sql::new(
                self.backend(),
                "SELECT hour, count FROM monitor_hours WHERE tenant_id = ",
            );
            sql.bind(e.tenant)
                .push(" AND user_id = ")
                .bind(user.clone());
            let mut histogram = [0i64; 24];
            for row in txn.query_all_raw(sql.build()).await? {
                let h: i32 = row.try_get_by_index(0)?;
                if let Some(slot) = usize::try_from(h).ok().and_then(|h| histogram.get_mut(h)) {
                    *slot = row.try_get_by_index(1)?;
                }
            }
            let mut sql = Sql::new(
                self.backend(),
                "INSERT INTO monitor_hours (tenant_id, user_id, hour, count) VALUES (",
            );
            sql.bind(e.tenant)
                .push(", ")
                .bind(user.clone())
                .push(", ")
                .bind(i32::try_from(hour).unwrap_or(0))
                .push(
                    ", 1) ON CONFLICT (tenant_id, user_id, hour) \
                     DO UPDATE SET count = monitor_hours.count + 1",
                );
            txn.execute_raw(sql.build()).await?;
            txn.commit().await?;
            let total: i64 = histogram.iter().sum();
            let at = |offset: i64| {
                histogram[usize::try_from((hour + offset).rem_euclid(24)).unwrap_or(0)]
            };
            if u64::try_from(total).unwrap_or(0) >= rule.min_history && at(-1) + at(0) + at(1) == 0
            {
                firings.push(Firing {
                    rule,
                    tenant: e.tenant,
                    key: user.clone(),
                    message: format!(
                        "{}: user {user} signed in at {hour:02}:00 UTC, an hour they never sign in at ({total} earlier sign-ins)",
                        rule.name
                    ),
                    event_ids: vec![e.record.event_id.to_string()],
                });
            }
        }
        Ok(firings)
    }

    /// Stores an alert, records it in its tenant's chain, and wakes the executor.
    async fn raise(&self, firing: Firing<'_>) -> Result<(), DbErr> {
        let rule = firing.rule;
        let now = now_micros();
        let id = Uuid::now_v7();
        let status = initial_status(rule);
        let message: String = firing.message.chars().take(1024).collect();
        let event_ids = serde_json::to_string(&firing.event_ids)
            .map_err(|e| DbErr::Custom(format!("monitor: {e}")))?;
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(
            self.backend(),
            "INSERT INTO monitor_alerts (id, tenant_id, rule, severity, key_kind, key, message, \
             event_ids, action, action_status, action_error, attempts, next_attempt_micros, state, \
             create_micros, update_micros, ack_micros, ack_principal_id, ack_note, revision) VALUES ",
        );
        sql.bind_list::<sea_orm::Value>([
            id.into(),
            firing.tenant.into(),
            rule.name.clone().into(),
            (rule.severity.proto() as i32).into(),
            (rule.key.proto() as i32).into(),
            firing.key.clone().into(),
            message.into(),
            event_ids.into(),
            (rule.action.proto() as i32).into(),
            (status as i32).into(),
            String::new().into(),
            0i32.into(),
            0i64.into(),
            (pb::AlertState::Open as i32).into(),
            now.into(),
            now.into(),
            Option::<i64>::None.into(),
            String::new().into(),
            String::new().into(),
            1i64.into(),
        ]);
        txn.execute_raw(sql.build()).await?;
        txn.commit().await?;
        tracing::warn!(alert = %id, rule = %rule.name, severity = ?rule.severity, action = ?rule.action, dry_run = rule.dry_run, "security alert raised");
        let mut attributes = BTreeMap::from([
            ("alert_id".to_owned(), id.to_string()),
            ("rule".to_owned(), rule.name.clone()),
            ("key_kind".to_owned(), key_name(rule.key).to_owned()),
            ("key".to_owned(), firing.key.clone()),
            (
                "action".to_owned(),
                format!("{:?}", rule.action).to_ascii_lowercase(),
            ),
        ]);
        if rule.dry_run {
            attributes.insert("dry_run".to_owned(), "true".to_owned());
        }
        let user = if rule.key == KeyKind::User {
            firing.key.clone()
        } else {
            String::new()
        };
        self.record(firing.tenant, "audit.alert", &id, user, None, attributes)
            .await?;
        if status == pb::ActionStatus::Pending {
            self.inner.wake.notify_one();
        }
        Ok(())
    }

    /// Appends one of the monitor's own events to `tenant`'s chain.
    async fn record(
        &self,
        tenant: Uuid,
        action: &str,
        alert: &Uuid,
        user_id: String,
        actor: Option<&Principal>,
        attributes: BTreeMap<String, String>,
    ) -> Result<(), DbErr> {
        let (kind, producer) = match actor {
            Some(p) => (p.kind.proto() as i32, p.id.clone()),
            None => (
                penny_proto::common::v1::PrincipalKind::Service as i32,
                "audit-monitor".to_owned(),
            ),
        };
        let event = NewEvent {
            record: Record {
                tenant_id: tenant,
                sequence: 0,
                event_id: Uuid::now_v7(),
                service: "audit".into(),
                producer_id: producer,
                action: action.into(),
                resource: "alert".into(),
                resource_id: alert.to_string(),
                principal_kind: kind,
                outcome: pb::Outcome::Success as i32,
                method: String::new(),
                duration_micros: 0,
                status: 0,
                trace_id: String::new(),
                event_time_micros: now_micros(),
                receive_time_micros: 0,
            },
            payload: Payload {
                user_id,
                attributes,
                ..Payload::default()
            },
        };
        self.inner.store.append(tenant, &[event]).await?;
        Ok(())
    }

    /// Carries out the actions that are due, claiming each so that one replica does it.
    async fn run_actions(&self) -> Result<(), DbErr> {
        let now = now_micros();
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(ALERT_COLUMNS)
            .push(" FROM monitor_alerts WHERE action_status IN ")
            .bind_list([
                pb::ActionStatus::Pending as i32,
                pb::ActionStatus::Failed as i32,
            ])
            .push(" AND attempts < ")
            .bind(MAX_ATTEMPTS)
            .push(" AND next_attempt_micros <= ")
            .bind(now)
            .push(" ORDER BY next_attempt_micros LIMIT 20");
        let due = txn
            .query_all_raw(sql.build())
            .await?
            .iter()
            .map(read_alert)
            .collect::<Result<Vec<_>, _>>()?;
        txn.commit().await?;
        for stored in due {
            let claim_until = now + i64::try_from(CLAIM.as_micros()).unwrap_or(i64::MAX);
            let id: Uuid = stored.alert.id.parse().unwrap_or_default();
            let txn = begin_platform(&self.inner.db).await?;
            let mut sql = Sql::new(
                self.backend(),
                "UPDATE monitor_alerts SET next_attempt_micros = ",
            );
            sql.bind(claim_until)
                .push(" WHERE id = ")
                .bind(id)
                .push(" AND next_attempt_micros = ")
                .bind(stored.next_attempt_micros)
                .push(" AND revision = ")
                .bind(stored.revision);
            let claimed = txn.execute_raw(sql.build()).await?.rows_affected() == 1;
            txn.commit().await?;
            if !claimed {
                continue;
            }
            let outcome = self.execute(&stored.alert).await;
            let attempts = stored.attempts + 1;
            let (status, error, next) = match outcome {
                Ok(()) => (pb::ActionStatus::Executed, String::new(), 0),
                Err(error) => {
                    tracing::warn!(alert = %id, attempts, error = %error, "monitor action failed");
                    // 1 s, 2 s, 4 s … at most 5 minutes.
                    let backoff = 1_000_000i64 << attempts.clamp(0, 8);
                    (
                        pb::ActionStatus::Failed,
                        error,
                        now_micros() + backoff.min(300_000_000),
                    )
                }
            };
            let txn = begin_platform(&self.inner.db).await?;
            let mut sql = Sql::new(self.backend(), "UPDATE monitor_alerts SET action_status = ");
            sql.bind(status as i32)
                .push(", action_error = ")
                .bind(error)
                .push(", attempts = ")
                .bind(attempts)
                .push(", next_attempt_micros = ")
                .bind(next)
                .push(", revision = revision + 1, update_micros = ")
                .bind(now_micros())
                .push(" WHERE id = ")
                .bind(id);
            txn.execute_raw(sql.build()).await?;
            txn.commit().await?;
        }
        Ok(())
    }

    /// Carries out one alert's action; the error is safe to store and show.
    async fn execute(&self, alert: &pb::Alert) -> Result<(), String> {
        let enforcers = &self.inner.enforcers;
        let credential = enforcers
            .credential
            .as_ref()
            .ok_or("audit has no credential to act with")?;
        let rule = self.inner.rules.rules.iter().find(|r| r.name == alert.rule);
        let reason = format!("security monitor: rule {} (alert {})", alert.rule, alert.id);
        let refused = |status: tonic::Status| {
            let message: String = status.message().chars().take(512).collect();
            format!("{:?}: {message}", status.code())
        };
        match pb::AlertAction::try_from(alert.action) {
            Ok(pb::AlertAction::BlockIp) => {
                let channel = enforcers.auth.clone().ok_or("auth is not configured")?;
                let secs = rule.map_or(3600, |r| r.block_secs);
                let request = credential
                    .service_request(penny_proto::auth::v1::BlockIpRequest {
                        cidr: alert.key.clone(),
                        tenant_id: String::new(),
                        reason,
                        duration: Some(prost_types::Duration {
                            seconds: i64::try_from(secs).unwrap_or(3600),
                            nanos: 0,
                        }),
                    })
                    .await
                    .map_err(|e| e.message().to_owned())?;
                AuthServiceClient::new(channel)
                    .block_ip(request)
                    .await
                    .map(|_| ())
                    .map_err(refused)
            }
            Ok(pb::AlertAction::SuspendUser) => {
                let channel = enforcers
                    .tenants
                    .clone()
                    .ok_or("tenants is not configured")?;
                let request = credential
                    .service_request(penny_proto::tenants::v1::SuspendUserRequest {
                        tenant_id: alert.tenant_id.clone(),
                        user_id: alert.key.clone(),
                        reason,
                        alert_id: alert.id.clone(),
                    })
                    .await
                    .map_err(|e| e.message().to_owned())?;
                TenantServiceClient::new(channel)
                    .suspend_user(request)
                    .await
                    .map(|_| ())
                    .map_err(refused)
            }
            _ => Ok(()),
        }
    }

    /// Polls the alerts table for changes (made by any replica) and announces each change
    /// once, while someone listens.
    async fn follow(&self, alive: std::sync::Weak<()>) {
        let mut since = now_micros() - FEED_LOOKBACK_MICROS;
        let mut announced: HashMap<String, (i64, i64)> = HashMap::new();
        loop {
            tokio::time::sleep(FEED_POLL).await;
            if alive.strong_count() == 0 {
                return;
            }
            if self.inner.feed.receiver_count() == 0 {
                since = now_micros() - FEED_LOOKBACK_MICROS;
                announced.clear();
                continue;
            }
            let changed = match self.changed_since(since).await {
                Ok(changed) => changed,
                Err(err) => {
                    tracing::warn!(error = %err, "alert feed could not read alerts; retrying");
                    continue;
                }
            };
            // A full page may hide more changes within the lookback: the next poll starts
            // at the last one seen, so a burst never stalls the feed.
            let full = changed.len() >= FEED_PAGE;
            let mut latest = since;
            for stored in changed {
                latest = latest.max(stored.update_micros);
                let seen = announced
                    .get(&stored.alert.id)
                    .map(|(revision, _)| *revision);
                if seen.is_some_and(|r| r >= stored.revision) {
                    continue;
                }
                announced.insert(
                    stored.alert.id.clone(),
                    (stored.revision, stored.update_micros),
                );
                let _ = self.inner.feed.send(Arc::new(stored.alert));
            }
            since = if full {
                since.max(latest)
            } else {
                since.max(latest - FEED_LOOKBACK_MICROS)
            };
            announced.retain(|_, (_, at)| *at >= since);
        }
    }

    async fn changed_since(&self, since: i64) -> Result<Vec<Stored>, DbErr> {
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(ALERT_COLUMNS)
            .push(" FROM monitor_alerts WHERE update_micros >= ")
            .bind(since)
            .push(" ORDER BY update_micros LIMIT ")
            .bind(i64::try_from(FEED_PAGE).unwrap_or(1000));
        let rows = txn.query_all_raw(sql.build()).await?;
        txn.commit().await?;
        rows.iter().map(read_alert).collect()
    }

    /// Alerts as they are raised or change.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<pb::Alert>> {
        self.inner.feed.subscribe()
    }

    /// A page of alerts, newest first, after `cursor` (create time, id).
    pub async fn list(
        &self,
        filter: &AlertFilter,
        cursor: Option<(i64, Uuid)>,
        limit: u64,
    ) -> Result<Vec<pb::Alert>, DbErr> {
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(ALERT_COLUMNS)
            .push(" FROM monitor_alerts WHERE 1 = 1");
        if let Some(tenant) = filter.tenant {
            sql.push(" AND tenant_id = ").bind(tenant);
        }
        if let Some(state) = filter.state {
            sql.push(" AND state = ").bind(state);
        }
        if let Some(severity) = filter.min_severity {
            sql.push(" AND severity >= ").bind(severity);
        }
        if let Some(start) = filter.start_micros {
            sql.push(" AND create_micros >= ").bind(start);
        }
        if let Some(end) = filter.end_micros {
            sql.push(" AND create_micros < ").bind(end);
        }
        if let Some((at, id)) = cursor {
            sql.push(" AND (create_micros < ")
                .bind(at)
                .push(" OR (create_micros = ")
                .bind(at)
                .push(" AND id < ")
                .bind(id)
                .push("))");
        }
        sql.push(" ORDER BY create_micros DESC, id DESC LIMIT ")
            .bind(i64::try_from(limit).unwrap_or(1000));
        let rows = txn.query_all_raw(sql.build()).await?;
        txn.commit().await?;
        rows.iter()
            .map(|row| read_alert(row).map(|s| s.alert))
            .collect()
    }

    /// Acknowledges an alert of `tenant`; `None` when there is none. Acknowledging an
    /// acknowledged alert changes nothing; the first acknowledgement is recorded in the
    /// tenant's chain.
    pub async fn ack(
        &self,
        caller: &Principal,
        tenant: Uuid,
        alert: Uuid,
        note: &str,
    ) -> Result<Option<pb::Alert>, DbErr> {
        let now = now_micros();
        let txn = begin_platform(&self.inner.db).await?;
        let mut sql = Sql::new(self.backend(), "UPDATE monitor_alerts SET state = ");
        sql.bind(pb::AlertState::Acknowledged as i32)
            .push(", ack_micros = ")
            .bind(now)
            .push(", ack_principal_id = ")
            .bind(caller.id.clone())
            .push(", ack_note = ")
            .bind(note.to_owned())
            .push(", revision = revision + 1, update_micros = ")
            .bind(now)
            .push(" WHERE id = ")
            .bind(alert)
            .push(" AND tenant_id = ")
            .bind(tenant)
            .push(" AND state = ")
            .bind(pb::AlertState::Open as i32);
        let changed = txn.execute_raw(sql.build()).await?.rows_affected() == 1;
        let mut sql = Sql::new(self.backend(), "SELECT ");
        sql.push(ALERT_COLUMNS)
            .push(" FROM monitor_alerts WHERE id = ")
            .bind(alert)
            .push(" AND tenant_id = ")
            .bind(tenant);
        let stored = txn
            .query_one_raw(sql.build())
            .await?
            .map(|row| read_alert(&row))
            .transpose()?;
        txn.commit().await?;
        if changed && let Some(stored) = &stored {
            let user = if Uuid::try_parse(&caller.id).is_ok() {
                caller.id.clone()
            } else {
                String::new()
            };
            let mut attributes = BTreeMap::from([("rule".to_owned(), stored.alert.rule.clone())]);
            if !note.is_empty() {
                attributes.insert("note".to_owned(), note.to_owned());
            }
            self.record(
                tenant,
                "audit.alert_ack",
                &alert,
                user,
                Some(caller),
                attributes,
            )
            .await?;
        }
        Ok(stored.map(|s| s.alert))
    }

    /// Drops counters older than every window, and firings that have lapsed.
    async fn prune(&self) -> Result<(), DbErr> {
        let now_secs = now_micros() / 1_000_000;
        let txn = begin_platform(&self.inner.db).await?;
        for rule in &self.inner.rules.rules {
            if rule.kind != Kind::Threshold || rule.window_secs == 0 {
                continue;
            }
            let width = rule.bucket_secs();
            let oldest =
                now_secs / width - i64::try_from(rules::BUCKETS_PER_WINDOW).unwrap_or(30) - 1;
            let mut sql = Sql::new(self.backend(), "DELETE FROM monitor_counts WHERE rule = ");
            sql.bind(rule.name.clone())
                .push(" AND bucket < ")
                .bind(oldest);
            txn.execute_raw(sql.build()).await?;
        }
        let mut sql = Sql::new(
            self.backend(),
            "DELETE FROM monitor_firings WHERE until_micros < ",
        );
        sql.bind(now_micros() - 3_600_000_000);
        txn.execute_raw(sql.build()).await?;
        txn.commit().await
    }

    /// Forgets what the monitor learnt about a user (networks, hours) and takes the user
    /// out of the alerts about them (their id, and the message naming it and a network):
    /// GDPR erasure. The alerts stay, with their rule, time and action.
    pub async fn forget_user(&self, tenant: Uuid, user: &str) -> Result<(), DbErr> {
        let txn = penny_platform::db::begin_tenant(&self.inner.db, tenant).await?;
        for table in ["monitor_networks", "monitor_hours"] {
            let mut sql = Sql::new(
                self.backend(),
                &format!("DELETE FROM {table} WHERE tenant_id = "),
            );
            sql.bind(tenant)
                .push(" AND user_id = ")
                .bind(user.to_owned());
            txn.execute_raw(sql.build()).await?;
        }
        let mut sql = Sql::new(
            self.backend(),
            "UPDATE monitor_alerts SET key = '', message = '(redacted)', \
             revision = revision + 1, update_micros = ",
        );
        sql.bind(now_micros())
            .push(" WHERE tenant_id = ")
            .bind(tenant)
            .push(" AND key_kind = ")
            .bind(pb::KeyKind::User as i32)
            .push(" AND key = ")
            .bind(user.to_owned());
        txn.execute_raw(sql.build()).await?;
        txn.commit().await
    }
}

/// The tenant an alert (and its counters) belongs to: IP addresses are counted across
/// every tenant, in the platform tenant.
fn alert_tenant(rule: &Rule, tenant: Uuid) -> Uuid {
    if rule.key == KeyKind::Ip {
        PLATFORM_TENANT_ID
    } else {
        tenant
    }
}

fn key_name(key: KeyKind) -> &'static str {
    match key {
        KeyKind::Ip => "ip",
        KeyKind::User => "user",
        KeyKind::ApiKey => "api key",
        KeyKind::Tenant => "tenant",
    }
}

/// What becomes of a new alert's action: carried out (PENDING until it is), not carried
/// out (dry run), or nothing to carry out.
fn initial_status(rule: &Rule) -> pb::ActionStatus {
    if rule.dry_run {
        pb::ActionStatus::DryRun
    } else if rule.action.is_executed() {
        pb::ActionStatus::Pending
    } else {
        pb::ActionStatus::NotApplicable
    }
}
