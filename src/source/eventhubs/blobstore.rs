//! The checkpoint store in Azure Blob Storage, in the layout every Azure SDK event processor uses
//! (`BlobCheckpointStore` of JavaScript, .NET, Java, Python, Rust), so that the connector and
//! Microsoft's processors of one consumer group share ownership and checkpoints:
//!
//! * `{namespace}/{hub}/{consumer group}/ownership/{partition}`: an empty blob whose metadata
//!   `ownerid` names the owner (empty: released); a claim is conditioned on the ETag seen
//!   (`If-Match`, or `If-None-Match: *` for a first claim), its `Last-Modified` is the renewal time.
//! * `{namespace}/{hub}/{consumer group}/checkpoint/{partition}`: metadata `offset` and
//!   `sequencenumber` of the last event processed.
//!
//! Namespace, hub and consumer group are lower-cased, as the SDKs do. The connector adds
//! `ownerlevel` to an ownership's metadata (the SDKs read only `ownerid`): the receiver's owner
//! level, which a claim raises by one. A processor's claim drops it (they replace the metadata);
//! the next claim by the connector then starts again from 1.

use super::balance::{Claim, Ownership};
use super::blob::{Account, BlobItem, Condition, Container};
use super::settings::EventHubs;
use super::store::{Checkpoint, CheckpointStore, Scope, StoreError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const OWNER_ID: &str = "ownerid";
const OWNER_LEVEL: &str = "ownerlevel";
const OFFSET: &str = "offset";
const SEQUENCE_NUMBER: &str = "sequencenumber";

/// The container `[eventhubs]` names, with its credentials, made if missing.
async fn container(s: &EventHubs) -> Result<Container, StoreError> {
    let setting = |key: &'static str, message: String| StoreError::Setting { key, message };
    let (account, token) = if s.blob_connection_string.is_empty() {
        (Account::from_url(&s.blob_url), super::identity::credential(s))
    } else {
        let account = Account::from_connection_string(&s.blob_connection_string)
            .map_err(|m| setting("eventhubs.blob_connection_string", m))?;
        (account, None)
    };
    let c = Container::new(account, &s.blob_container, token, &s.blob_ca_file)
        .map_err(|m| setting("eventhubs.blob_ca_file", m))?;
    c.create().await.map_err(|e| StoreError::Blob { container: c.describe(), source: e })?;
    Ok(c)
}

pub struct BlobStore {
    c: Container,
    /// `{namespace}/{hub}/{consumer group}/`, lower-cased.
    prefix: String,
    /// The ownerships this instance holds: partition → (ETag of its blob, owner level). A
    /// renewal or release is conditioned on the ETag; the store does not hand it out.
    held: Mutex<HashMap<String, (String, i64)>>,
}

impl BlobStore {
    pub async fn open(s: &EventHubs, scope: Scope) -> Result<BlobStore, StoreError> {
        let c = container(s).await?;
        let prefix = format!("{}/{}/{}/", scope.namespace, scope.hub, scope.consumer_group).to_lowercase();
        Ok(BlobStore { c, prefix, held: Mutex::new(HashMap::new()) })
    }

    fn err(&self, e: super::blob::BlobError) -> StoreError {
        StoreError::Blob { container: self.c.describe(), source: e }
    }

    fn ownership_blob(&self, partition: &str) -> String {
        format!("{}ownership/{partition}", self.prefix)
    }

    fn checkpoint_blob(&self, partition: &str) -> String {
        format!("{}checkpoint/{partition}", self.prefix)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, i64)>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What this instance holds of `partition` at `version`: the ETag to condition on.
    fn held_etag(&self, partition: &str, version: i64) -> Option<String> {
        self.held().get(partition).filter(|(_, v)| *v == version).map(|(e, _)| e.clone())
    }

    /// Sets an ownership's metadata on the ETag held; keeps the new ETag. `false`: changed meanwhile.
    async fn rewrite(&self, partition: &str, owner: &str, version: i64) -> Result<bool, StoreError> {
        let Some(etag) = self.held_etag(partition, version) else { return Ok(false) };
        let level = version.to_string();
        let meta = [(OWNER_ID, owner), (OWNER_LEVEL, level.as_str())];
        let blob = self.ownership_blob(partition);
        match self.c.set_metadata(&blob, &meta, Condition::Matches(etag)).await.map_err(|e| self.err(e))? {
            Some(item) if !owner.is_empty() => {
                self.held().insert(partition.to_string(), (item.etag, version));
                Ok(true)
            }
            Some(_) => {
                self.held().remove(partition);
                Ok(true)
            }
            None => {
                self.held().remove(partition);
                Ok(false)
            }
        }
    }
}

fn ownership(item: &BlobItem) -> Ownership {
    let age = match (item.now, item.last_modified) {
        (Some(now), Some(then)) => (now - then).to_std().unwrap_or(Duration::ZERO),
        // No times to go by: taken as just renewed, so nothing is stolen for want of a clock.
        _ => Duration::ZERO,
    };
    Ownership {
        partition: item.name.rsplit('/').next().unwrap_or("").to_string(),
        owner: item.metadata.get(OWNER_ID).cloned().unwrap_or_default(),
        version: item.metadata.get(OWNER_LEVEL).and_then(|v| v.parse().ok()).unwrap_or(0),
        age,
        etag: Some(item.etag.clone()),
    }
}

fn checkpoint(item: &BlobItem) -> Option<Checkpoint> {
    let sequence_number = item.metadata.get(SEQUENCE_NUMBER)?.trim().parse().ok()?;
    let offset = item.metadata.get(OFFSET).cloned().unwrap_or_default();
    Some(Checkpoint { offset, sequence_number, enqueued_time: None })
}

#[async_trait::async_trait]
impl CheckpointStore for BlobStore {
    async fn ownerships(&self) -> Result<Vec<Ownership>, StoreError> {
        let items = self.c.list(&format!("{}ownership/", self.prefix)).await.map_err(|e| self.err(e))?;
        Ok(items.iter().map(ownership).collect())
    }

    async fn claim(&self, me: &str, claim: &Claim) -> Result<Option<i64>, StoreError> {
        let version = claim.version + 1;
        let level = version.to_string();
        let meta = [(OWNER_ID, me), (OWNER_LEVEL, level.as_str())];
        let blob = self.ownership_blob(&claim.partition);
        let written = match &claim.etag {
            Some(etag) => self.c.set_metadata(&blob, &meta, Condition::Matches(etag.clone())).await,
            None => self.c.put(&blob, &meta, Condition::Absent).await,
        };
        match written.map_err(|e| self.err(e))? {
            Some(item) => {
                self.held().insert(claim.partition.clone(), (item.etag, version));
                Ok(Some(version))
            }
            None => Ok(None),
        }
    }

    async fn renew(&self, me: &str, owned: &[(String, i64)]) -> Result<Vec<String>, StoreError> {
        let mut kept = Vec::new();
        for (p, v) in owned {
            if self.rewrite(p, me, *v).await? {
                kept.push(p.clone());
            }
        }
        Ok(kept)
    }

    async fn release(&self, _me: &str, partition: &str, version: i64) -> Result<(), StoreError> {
        self.rewrite(partition, "", version).await.map(|_| ())
    }

    async fn checkpoint(&self, partition: &str) -> Result<Option<Checkpoint>, StoreError> {
        let item = self.c.properties(&self.checkpoint_blob(partition)).await.map_err(|e| self.err(e))?;
        Ok(item.as_ref().and_then(checkpoint))
    }

    /// Two blobs cannot change together: the ownership is read first (still `me` at `version`),
    /// then the checkpoint is written on the ETag it was read at, only forward.
    async fn set_checkpoint(
        &self,
        me: &str,
        version: i64,
        partition: &str,
        c: &Checkpoint,
    ) -> Result<bool, StoreError> {
        let owner = self.c.properties(&self.ownership_blob(partition)).await.map_err(|e| self.err(e))?;
        let mine = owner.as_ref().map(ownership).is_some_and(|o| o.owner == me && o.version == version);
        if !mine {
            return Ok(false);
        }
        let blob = self.checkpoint_blob(partition);
        let current = self.c.properties(&blob).await.map_err(|e| self.err(e))?;
        if current.as_ref().and_then(checkpoint).is_some_and(|now| now.sequence_number >= c.sequence_number) {
            return Ok(false);
        }
        let condition = current.map_or(Condition::Absent, |i| Condition::Matches(i.etag));
        let seq = c.sequence_number.to_string();
        let meta = [(SEQUENCE_NUMBER, seq.as_str()), (OFFSET, c.offset.as_str())];
        // An empty blob written whole: it also makes the checkpoint blob the first time.
        let written = self.c.put(&blob, &meta, condition).await.map_err(|e| self.err(e))?;
        Ok(written.is_some())
    }
}

/// The dead letters `dead-letters redrive` sent back, as empty blobs
/// `{namespace}/{dead-letter hub}/$iomt/redriven/{partition}/{sequence number}` (no consumer group
/// may be named `$iomt`, so no processor's blobs are there).
pub struct BlobRedriven {
    c: Container,
    prefix: String,
}

impl BlobRedriven {
    pub async fn open(s: &EventHubs, dead_letter_hub: &str) -> Result<BlobRedriven, StoreError> {
        let c = container(s).await?;
        let prefix = format!("{}/{}/$iomt/redriven/", s.namespace_host(), dead_letter_hub).to_lowercase();
        Ok(BlobRedriven { c, prefix })
    }

    pub async fn of_partition(
        &self,
        partition: &str,
        from: i64,
        to: i64,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        let items = self.c.list(&format!("{}{partition}/", self.prefix)).await;
        let items = items.map_err(|e| StoreError::Blob { container: self.c.describe(), source: e })?;
        Ok(items
            .iter()
            .filter_map(|i| i.name.rsplit('/').next()?.parse::<i64>().ok())
            .filter(|n| (from..=to).contains(n))
            .collect())
    }

    pub async fn record(&self, partition: &str, sequence_number: i64, sent_to: &str) -> Result<(), StoreError> {
        let blob = format!("{}{partition}/{sequence_number}", self.prefix);
        let meta = [("sentto", sent_to), ("redriven", &chrono::Utc::now().to_rfc3339())];
        self.c
            .put(&blob, &meta, Condition::Absent)
            .await
            .map_err(|e| StoreError::Blob { container: self.c.describe(), source: e })?;
        Ok(())
    }
}
