//! RewrapTenant: after the tenant's key is rotated, every file's data key is rewrapped by
//! the keys service to the latest version (the objects are not touched: only the wrapped
//! key in each row changes), so the old versions can be retired with keys'
//! `min_decryption_version`. The job lives in the database: it reports progress to any
//! replica, survives a restart (calling again resumes it), and one replica at a time works
//! on it, holding it by a lease it extends as it goes; one whose lease passed and whose job
//! another took over stops at its next save, which writes nothing (the claim's start time
//! fences it off): it finishes the batch in hand, but no counts and no end.

use std::time::Duration;

use penny_platform::{ApiError, Reason};
use penny_proto::audit::v1 as audit_pb;
use penny_proto::keys::v1 as keys_pb;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{RewrapJob, RewrapState};
use crate::service::{Files, dependency, key_context};
use crate::store::rewrap::WrappedKey;

/// Files per Rewrap call to keys.
const BATCH: u64 = 100;
/// How long a replica holds a job between two steps before another may take it over.
const LEASE: Duration = Duration::from_secs(30);
/// Passes over the files before a job gives up on what is still below the target.
const PASSES: usize = 3;
/// How often a waiting call looks at the job.
const POLL: Duration = Duration::from_millis(100);
/// Tenants per page of the background rewrap's look across tenants.
const TENANT_PAGE: u64 = 500;
/// Failures of one background pass logged one by one; the rest only counted.
const LOGGED_FAILURES: u64 = 10;
/// How often each replica looks for tenants whose files are behind their key, unless
/// configured otherwise.
pub const DEFAULT_REWRAP_EVERY: Duration = Duration::from_secs(3600);

/// Sets a job's end state from the files at the target (`current` of `total`): after every
/// pass, what is left below the target is what keys refused (or arrived too late for the
/// passes), and the job SUCCEEDED only if nothing is. A job that `stopped` (keys or the
/// database failing) FAILED without counting any file as refused, since it did not get to
/// them all: the next background pass resumes it.
fn end(job: &mut RewrapJob, stopped: bool, total: u64, current: u64) {
    job.total_files = total;
    job.rewrapped_files = current;
    // Two counts, two statements: files committed between them can make `current` the
    // larger.
    job.failed_files = if stopped {
        0
    } else {
        total.saturating_sub(current)
    };
    job.state = if stopped || job.failed_files > 0 {
        RewrapState::Failed
    } else {
        RewrapState::Succeeded
    };
}

/// Whether `job` failed on files keys refused to rewrap to `latest` (or newer): another
/// run would fail on them the same way, so the background leaves it for an operator.
fn refused(job: &RewrapJob, latest: u32) -> bool {
    job.state == RewrapState::Failed && job.failed_files > 0 && job.target_key_version >= latest
}

/// How long the background rewrap waits for one answer from keys.
const BACKGROUND_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request to start a tenant's rewrap came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A job was claimed and runs here.
    Started,
    /// A replica holds a running job, or every file is at the target already.
    NotNeeded,
    /// The last job at this target failed on files keys refused: left for RewrapTenant.
    LeftForAnOperator,
}

/// What one pass of the background rewrap did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackgroundRewrap {
    /// Tenants with files, looked at.
    pub tenants: u64,
    /// Rewraps started (or resumed) by this pass.
    pub started: u64,
    /// Tenants behind whose last job failed on files keys refused to rewrap, left for an
    /// operator's RewrapTenant.
    pub left: u64,
    /// Tenants that could not be looked at (keys refused, the database failed).
    pub failed: u64,
    /// Whether the pass ended early because keys could not be reached.
    pub stopped: bool,
}

impl BackgroundRewrap {
    /// Logs the pass when it did, left or failed anything.
    pub fn log(&self) {
        if self.started > 0 || self.left > 0 || self.failed > 0 {
            tracing::info!(
                tenants = self.tenants,
                started = self.started,
                left = self.left,
                failed = self.failed,
                stopped = self.stopped,
                "files: background rewrap pass"
            );
        }
    }
}

/// A job and the lowest key version still in use.
#[derive(Debug, Clone)]
pub struct RewrapStatus {
    /// The job as it stands.
    pub job: RewrapJob,
    /// The lowest key version any of the tenant's files uses (the target when it has
    /// none): once it equals the target, keys' minimum decryption version may be raised.
    pub min_key_version_in_use: u32,
}

fn db(err: &sea_orm::DbErr) -> ApiError {
    ApiError::database(err)
}

impl Files {
    /// The tenant key's latest version, from keys.
    pub(crate) async fn latest_key_version(&self, tenant: Uuid) -> Result<u32, ApiError> {
        let request = self
            .authorizer()
            .service_request(keys_pb::GetKeyRequest {
                tenant_id: tenant.to_string(),
            })
            .await?;
        match self.keys().get_key(request).await {
            Ok(reply) => reply
                .into_inner()
                .key
                .map(|k| k.latest_version)
                .ok_or_else(|| ApiError::internal(&"keys answered no key")),
            Err(status) if status.code() == tonic::Code::NotFound => Err(ApiError::not_found(
                Reason::NotFound,
                "the tenant has no key",
            )),
            Err(status) => Err(dependency("the keys service", &status)),
        }
    }

    /// Starts the tenant's rewrap to its key's latest version, resumes a failed or
    /// abandoned one, or reports the one running; with `wait_until`, waits until then at
    /// most for it to end.
    pub async fn rewrap_tenant(
        &self,
        tenant: Uuid,
        wait_until: Option<tokio::time::Instant>,
    ) -> Result<RewrapStatus, ApiError> {
        let latest = self.latest_key_version(tenant).await?;
        self.start_rewrap(tenant, latest, false).await?;
        let store = self.store();
        if let Some(until) = wait_until {
            while tokio::time::Instant::now() < until {
                let job = store.rewrap_job(tenant).await.map_err(|e| db(&e))?;
                if job.is_none_or(|j| j.state != RewrapState::Running) {
                    break;
                }
                tokio::time::sleep_until(until.min(tokio::time::Instant::now() + POLL)).await;
            }
        }
        let job = store
            .rewrap_job(tenant)
            .await
            .map_err(|e| db(&e))?
            .ok_or_else(|| ApiError::internal(&"the rewrap job vanished"))?;
        let (_, _, lowest) = store
            .key_versions(tenant, job.target_key_version)
            .await
            .map_err(|e| db(&e))?;
        Ok(RewrapStatus {
            min_key_version_in_use: lowest.unwrap_or(job.target_key_version),
            job,
        })
    }

    /// Starts the tenant's rewrap to `latest` unless a replica holds a running job or the
    /// last one reached `latest` with every file; resumes a failed or abandoned one, except,
    /// for the `background`, one at `latest` that failed on files keys refused to rewrap
    /// (a file below the key's minimum version, a damaged wrapped key): another run would
    /// fail on them the same way, so that one waits for an operator's RewrapTenant.
    async fn start_rewrap(
        &self,
        tenant: Uuid,
        latest: u32,
        background: bool,
    ) -> Result<Start, ApiError> {
        let store = self.store();
        let now = OffsetDateTime::now_utc();
        let existing = store.rewrap_job(tenant).await.map_err(|e| db(&e))?;
        let held = existing
            .as_ref()
            .is_some_and(|j| j.state == RewrapState::Running && j.lease_until > now);
        if held {
            return Ok(Start::NotNeeded);
        }
        if background && existing.as_ref().is_some_and(|j| refused(j, latest)) {
            return Ok(Start::LeftForAnOperator);
        }
        let (total, current, _) = store
            .key_versions(tenant, latest)
            .await
            .map_err(|e| db(&e))?;
        let done = existing
            .as_ref()
            .is_some_and(|j| j.state == RewrapState::Succeeded && j.target_key_version >= latest)
            && current == total;
        if done {
            return Ok(Start::NotNeeded);
        }
        let job = RewrapJob {
            tenant_id: tenant,
            state: RewrapState::Running,
            target_key_version: latest,
            total_files: total,
            rewrapped_files: current,
            failed_files: 0,
            started_at: now,
            ended_at: None,
            lease_until: now + LEASE,
        };
        let (job, claimed) = store
            .claim_rewrap_job(&job, now)
            .await
            .map_err(|e| db(&e))?;
        if !claimed {
            return Ok(Start::NotNeeded);
        }
        self.record_rewrap(&job, "files.rewrap_started", audit_pb::Outcome::Attempted);
        tokio::spawn(self.clone().run_rewrap(job));
        Ok(Start::Started)
    }

    /// The tenant key's latest version for the background rewrap: `None` when keys has no
    /// key for the tenant (a deleted tenant's was shredded). Bounded by
    /// `BACKGROUND_CALL_TIMEOUT`, as no caller's deadline bounds it.
    async fn background_latest(&self, tenant: Uuid) -> Result<Option<u32>, tonic::Status> {
        let mut request = self
            .authorizer()
            .service_request(keys_pb::GetKeyRequest {
                tenant_id: tenant.to_string(),
            })
            .await
            .map_err(tonic::Status::from)?;
        request.set_timeout(BACKGROUND_CALL_TIMEOUT);
        match tokio::time::timeout(BACKGROUND_CALL_TIMEOUT, self.keys().get_key(request)).await {
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "keys did not answer in time",
            )),
            Ok(Ok(reply)) => Ok(Some(
                reply
                    .into_inner()
                    .key
                    .ok_or_else(|| tonic::Status::internal("keys answered no key"))?
                    .latest_version,
            )),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(None),
            Ok(Err(status)) => Err(status),
        }
    }

    /// Every `every`, for as long as the service lives (the task holds only a weak
    /// reference to it), rewraps the tenants whose files use an older key version than
    /// their key's latest ([`Files::rewrap_behind`]): after a rotation, every file's data
    /// key follows without anyone calling RewrapTenant. Every replica may run it; a job's
    /// lease lets one replica at a time work on a tenant.
    pub fn rewrap_periodically(&self, every: Duration) {
        self.periodically(every, |files| async move {
            match files.rewrap_behind().await {
                Ok(pass) => pass.log(),
                Err(err) => {
                    tracing::warn!(error = %err.message(), "files: the background rewrap could not list tenants; the next pass tries again");
                }
            }
        });
    }

    /// One pass of the background rewrap: asks keys for the latest key version of every
    /// tenant that has files and starts (or resumes) the rewrap of each tenant whose files
    /// use an older one. A tenant whose key is gone (a deleted tenant) is left alone: its
    /// files can no longer be decrypted by anyone. The pass ends early when keys (or the
    /// credential files calls it with) cannot be reached: the next pass tries again.
    pub async fn rewrap_behind(&self) -> Result<BackgroundRewrap, ApiError> {
        let mut pass = BackgroundRewrap::default();
        let mut after = None;
        loop {
            let page = self
                .store()
                .lowest_key_versions(after, TENANT_PAGE)
                .await
                .map_err(|e| db(&e))?;
            let Some(&(last, _)) = page.last() else {
                break;
            };
            after = Some(last);
            for &(tenant, lowest) in &page {
                pass.tenants += 1;
                let latest = match self.background_latest(tenant).await {
                    Ok(Some(latest)) => latest,
                    Ok(None) => continue,
                    Err(status) if penny_platform::error::is_transient(&status) => {
                        tracing::warn!(code = ?status.code(), "files: keys cannot be reached; the background rewrap stops until its next pass");
                        pass.stopped = true;
                        return Ok(pass);
                    }
                    Err(status) => {
                        pass.failed += 1;
                        if pass.failed <= LOGGED_FAILURES {
                            tracing::warn!(%tenant, code = ?status.code(), "files: keys would not name a tenant key's latest version; the next pass tries again");
                        }
                        continue;
                    }
                };
                if lowest >= latest {
                    continue;
                }
                match self.start_rewrap(tenant, latest, true).await {
                    Ok(Start::Started) => pass.started += 1,
                    Ok(Start::NotNeeded) => {}
                    Ok(Start::LeftForAnOperator) => pass.left += 1,
                    Err(err) => {
                        pass.failed += 1;
                        if pass.failed <= LOGGED_FAILURES {
                            tracing::warn!(%tenant, error = %err.message(), "files: the background rewrap could not start a tenant's job; the next pass tries again");
                        }
                    }
                }
            }
            if page.len() < usize::try_from(TENANT_PAGE).unwrap_or(usize::MAX) {
                break;
            }
        }
        Ok(pass)
    }

    /// Works through the tenant's files below the target in id order, in passes: a file
    /// committed behind the cursor (an upload that began before the rotation) is caught
    /// by the next pass. The job succeeds only when no file is left below the target.
    async fn run_rewrap(self, mut job: RewrapJob) {
        let store = self.store().clone();
        let tenant = job.tenant_id;
        let mut stopped = false;
        'passes: for _ in 0..PASSES {
            let mut after = None;
            let mut seen = 0;
            loop {
                let batch = match store
                    .files_below(tenant, job.target_key_version, after, BATCH)
                    .await
                {
                    Ok(batch) => batch,
                    Err(err) => {
                        tracing::error!(%tenant, error = %err, "rewrap: the files database failed");
                        stopped = true;
                        break 'passes;
                    }
                };
                let Some(last) = batch.last() else {
                    break;
                };
                after = Some(last.id);
                seen += batch.len();
                match self.rewrap_batch(&job, &batch).await {
                    Ok((rewrapped, _)) => job.rewrapped_files += rewrapped,
                    Err(err) => {
                        tracing::warn!(%tenant, error = %err.message(), "rewrap stopped; the next background pass or a RewrapTenant call resumes it");
                        stopped = true;
                        break 'passes;
                    }
                }
                job.lease_until = OffsetDateTime::now_utc() + LEASE;
                match store.save_rewrap_job(&job).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(%tenant, "rewrap: this replica's lease passed and another took the job over; stopping");
                        return;
                    }
                    Err(err) => {
                        tracing::error!(%tenant, error = %err, "rewrap: cannot save progress");
                        stopped = true;
                        break 'passes;
                    }
                }
            }
            if seen == 0 {
                break;
            }
        }
        // The counts are recomputed rather than summed over passes.
        match store.key_versions(tenant, job.target_key_version).await {
            Ok((total, current, _)) => end(&mut job, stopped, total, current),
            Err(err) => {
                tracing::error!(%tenant, error = %err, "rewrap: cannot count the files");
                let (total, current) = (job.total_files, job.rewrapped_files);
                end(&mut job, true, total, current);
            }
        }
        let now = OffsetDateTime::now_utc();
        job.ended_at = Some(now);
        job.lease_until = now;
        match store.save_rewrap_job(&job).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%tenant, "rewrap: this replica's lease passed and another took the job over; its end is the other's to report");
                return;
            }
            Err(err) => {
                tracing::error!(%tenant, error = %err, "rewrap: cannot save the job's end");
            }
        }
        let outcome = if job.state == RewrapState::Succeeded {
            audit_pb::Outcome::Success
        } else {
            audit_pb::Outcome::Failure
        };
        self.record_rewrap(&job, "files.rewrap_finished", outcome);
    }

    /// Rewraps one batch through keys and stores the new wrapped keys: (rewrapped,
    /// refused by keys). A file changed meanwhile (deleted, or rewrapped by another run) is
    /// neither.
    async fn rewrap_batch(
        &self,
        job: &RewrapJob,
        batch: &[WrappedKey],
    ) -> Result<(u64, u64), ApiError> {
        let tenant = job.tenant_id;
        let request = self
            .authorizer()
            .service_request(keys_pb::RewrapRequest {
                tenant_id: tenant.to_string(),
                items: batch
                    .iter()
                    .map(|f| keys_pb::RewrapItem {
                        ciphertext: f.wrapped_key.clone(),
                        context: Some(key_context(f.id)),
                    })
                    .collect(),
            })
            .await?;
        let results = self
            .keys()
            .rewrap(request)
            .await
            .map_err(|s| dependency("the keys service", &s))?
            .into_inner()
            .results;
        if results.len() != batch.len() {
            return Err(ApiError::internal(
                &"keys answered a rewrap with another number of results",
            ));
        }
        let (mut rewrapped, mut failed) = (0, 0);
        for (file, result) in batch.iter().zip(results) {
            match result.result {
                Some(keys_pb::rewrap_result::Result::Ciphertext(wrapped))
                    if result.key_version >= job.target_key_version =>
                {
                    match self
                        .store()
                        .set_wrapped_key(
                            tenant,
                            file.id,
                            &file.wrapped_key,
                            &wrapped,
                            result.key_version,
                        )
                        .await
                    {
                        Ok(true) => rewrapped += 1,
                        Ok(false) => {}
                        Err(err) => return Err(db(&err)),
                    }
                }
                other => {
                    let reason = match other {
                        Some(keys_pb::rewrap_result::Result::Error(e)) => e.reason,
                        _ => 0,
                    };
                    tracing::warn!(%tenant, file = %file.id, reason, "rewrap: keys would not rewrap a file's data key");
                    failed += 1;
                }
            }
        }
        Ok((rewrapped, failed))
    }

    fn record_rewrap(&self, job: &RewrapJob, action: &str, outcome: audit_pb::Outcome) {
        self.record_tenant_event(
            None,
            job.tenant_id,
            action,
            outcome,
            vec![
                ("target_key_version", job.target_key_version.to_string()),
                ("total_files", job.total_files.to_string()),
                ("rewrapped_files", job.rewrapped_files.to_string()),
                ("failed_files", job.failed_files.to_string()),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(target: u32) -> RewrapJob {
        let now = OffsetDateTime::now_utc();
        RewrapJob {
            tenant_id: Uuid::nil(),
            state: RewrapState::Running,
            target_key_version: target,
            total_files: 0,
            rewrapped_files: 0,
            failed_files: 0,
            started_at: now,
            ended_at: None,
            lease_until: now,
        }
    }

    #[test]
    fn a_job_that_ran_its_passes_counts_what_is_left_as_refused_and_is_left_for_an_operator() {
        let mut job = running(2);
        end(&mut job, false, 10, 8);
        assert_eq!(
            (job.state, job.rewrapped_files, job.failed_files),
            (RewrapState::Failed, 8, 2)
        );
        assert!(refused(&job, 2));
        // A later rotation gives the background a new target to try.
        assert!(!refused(&job, 3));
    }

    #[test]
    fn a_job_that_stopped_counts_nothing_as_refused_and_is_resumed_by_the_background() {
        let mut job = running(2);
        end(&mut job, true, 10, 4);
        assert_eq!(
            (job.state, job.rewrapped_files, job.failed_files),
            (RewrapState::Failed, 4, 0)
        );
        assert!(!refused(&job, 2));
    }

    #[test]
    fn a_job_with_every_file_at_the_target_succeeds() {
        let mut job = running(2);
        // A file committed between the two counts can make `current` the larger.
        end(&mut job, false, 10, 11);
        assert_eq!((job.state, job.failed_files), (RewrapState::Succeeded, 0));
        assert!(!refused(&job, 2));
    }
}
