//! The checkpoint store: partition ownership and checkpoints, shared by every instance consuming
//! one hub with one consumer group (`CheckpointStore`). Two: PostgreSQL (`PgStore`, here: every
//! instance can reach it, its clock is the one all expiry decisions use, and a conditional
//! `UPDATE` is the compare-and-swap a claim needs) and Azure Blob Storage in the Azure SDKs'
//! layout (`blobstore::BlobStore`), which Microsoft's event processors share.
//!
//! Rows are keyed like the Azure SDKs' blob layout (namespace, hub, consumer group, partition), so
//! one database can serve many hubs and groups. The dead letters `dead-letters redrive` has sent
//! back are recorded here too (`Redriven`).

use super::balance::{Claim, Ownership};
use super::settings::{CheckpointStoreKind, EventHubs};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// Where a partition's events have all been persisted or dead-lettered up to (inclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Opaque to us: the service's own offset text.
    pub offset: String,
    pub sequence_number: i64,
    pub enqueued_time: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint store (eventhubs.checkpoint_postgres_url): {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("checkpoint store in Blob Storage ({container}; eventhubs.blob_*): {source}")]
    Blob { container: String, source: super::blob::BlobError },
    #[error("checkpoint store: {key} {message}")]
    Setting { key: &'static str, message: String },
}

/// Ownership and checkpoints of one hub and consumer group, wherever they are kept.
#[async_trait::async_trait]
pub trait CheckpointStore: Send + Sync {
    /// Every ownership of this hub and group, aged by the store's clock.
    async fn ownerships(&self) -> Result<Vec<Ownership>, StoreError>;
    /// Claims a partition from the version (and ETag) of its ownership that `claim` saw.
    /// `Some(version)` of the new ownership when this instance won it; `None` when another
    /// instance changed it first. The version is the receiver's owner level.
    async fn claim(&self, me: &str, claim: &Claim) -> Result<Option<i64>, StoreError>;
    /// Renews what this instance owns; returns the partitions it still owns at the versions given.
    async fn renew(&self, me: &str, owned: &[(String, i64)]) -> Result<Vec<String>, StoreError>;
    /// Gives a partition up (a clean stop), so another instance can take it without waiting for
    /// the ownership to expire.
    async fn release(&self, me: &str, partition: &str, version: i64) -> Result<(), StoreError>;
    async fn checkpoint(&self, partition: &str) -> Result<Option<Checkpoint>, StoreError>;
    /// Moves a partition's checkpoint forward, only while `me` owns it at `version` and only
    /// forward. `false` when it was not written for either reason.
    async fn set_checkpoint(&self, me: &str, version: i64, partition: &str, c: &Checkpoint)
    -> Result<bool, StoreError>;
}

/// The store `eventhubs.checkpoint_store` names, opened (tables or container made if missing).
pub async fn open(s: &EventHubs, scope: Scope) -> Result<Box<dyn CheckpointStore>, StoreError> {
    Ok(match s.checkpoint_store {
        CheckpointStoreKind::Postgres => Box::new(PgStore::open(&s.checkpoint_postgres_url, scope).await?),
        CheckpointStoreKind::Blob => Box::new(super::blobstore::BlobStore::open(s, scope).await?),
    })
}

/// The hub and consumer group a store's rows belong to.
#[derive(Debug, Clone)]
pub struct Scope {
    pub namespace: String,
    pub hub: String,
    pub consumer_group: String,
}

pub struct PgStore {
    url: String,
    scope: Scope,
    client: Mutex<Option<Arc<Client>>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS iomt_eventhubs_ownership (
    namespace text NOT NULL, hub text NOT NULL, consumer_group text NOT NULL, partition_id text NOT NULL,
    owner_id text NOT NULL, version bigint NOT NULL, last_modified timestamptz NOT NULL,
    PRIMARY KEY (namespace, hub, consumer_group, partition_id));
CREATE TABLE IF NOT EXISTS iomt_eventhubs_checkpoint (
    namespace text NOT NULL, hub text NOT NULL, consumer_group text NOT NULL, partition_id text NOT NULL,
    \"offset\" text NOT NULL, sequence_number bigint NOT NULL, enqueued_time timestamptz,
    owner_id text NOT NULL, updated timestamptz NOT NULL,
    PRIMARY KEY (namespace, hub, consumer_group, partition_id));
";

impl PgStore {
    /// Connects and creates the two tables if they are missing.
    pub async fn open(url: &str, scope: Scope) -> Result<PgStore, StoreError> {
        let store = PgStore { url: url.to_string(), scope, client: Mutex::new(None) };
        store.client().await?.batch_execute(SCHEMA).await?;
        Ok(store)
    }

    /// The connection, opened again if it was lost (a restarted database is no reason to stop).
    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        actix_rt::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "checkpoint store connection ended");
            }
        });
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Every checkpoint of this hub and group, by partition.
    pub async fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        let s = &self.scope;
        let rows = self
            .client()
            .await?
            .query(
                "SELECT partition_id, \"offset\", sequence_number, enqueued_time FROM iomt_eventhubs_checkpoint
                 WHERE namespace = $1 AND hub = $2 AND consumer_group = $3 ORDER BY partition_id",
                &[&s.namespace, &s.hub, &s.consumer_group],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), Checkpoint { offset: r.get(1), sequence_number: r.get(2), enqueued_time: r.get(3) }))
            .collect())
    }
}

#[async_trait::async_trait]
impl CheckpointStore for PgStore {
    /// Every ownership row of this hub and group, aged by the database's clock.
    async fn ownerships(&self) -> Result<Vec<Ownership>, StoreError> {
        let s = &self.scope;
        let rows = self
            .client()
            .await?
            .query(
                "SELECT partition_id, owner_id, version,
                        GREATEST(EXTRACT(EPOCH FROM (now() - last_modified)), 0)::float8
                 FROM iomt_eventhubs_ownership WHERE namespace = $1 AND hub = $2 AND consumer_group = $3",
                &[&s.namespace, &s.hub, &s.consumer_group],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Ownership {
                partition: r.get(0),
                owner: r.get(1),
                version: r.get(2),
                age: Duration::from_secs_f64(r.get::<_, f64>(3)),
                etag: None,
            })
            .collect())
    }

    /// Claims a partition from the version of its row that `claim` saw. `Some(version)` of the
    /// new row when this instance won it; `None` when another instance changed it first.
    async fn claim(&self, me: &str, claim: &Claim) -> Result<Option<i64>, StoreError> {
        let s = &self.scope;
        let row = self
            .client()
            .await?
            .query_opt(
                "INSERT INTO iomt_eventhubs_ownership AS o
                     (namespace, hub, consumer_group, partition_id, owner_id, version, last_modified)
                 VALUES ($1, $2, $3, $4, $5, 1, now())
                 ON CONFLICT (namespace, hub, consumer_group, partition_id) DO UPDATE
                     SET owner_id = EXCLUDED.owner_id, version = o.version + 1, last_modified = now()
                     WHERE o.version = $6
                 RETURNING version",
                &[&s.namespace, &s.hub, &s.consumer_group, &claim.partition, &me, &claim.version],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Renews what this instance owns; returns the partitions it still owns at the versions given.
    async fn renew(&self, me: &str, owned: &[(String, i64)]) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let s = &self.scope;
        let mut kept = Vec::new();
        for (p, v) in owned {
            let n = client
                .execute(
                    "UPDATE iomt_eventhubs_ownership SET last_modified = now()
                     WHERE namespace = $1 AND hub = $2 AND consumer_group = $3 AND partition_id = $4
                       AND owner_id = $5 AND version = $6",
                    &[&s.namespace, &s.hub, &s.consumer_group, p, &me, v],
                )
                .await?;
            if n == 1 {
                kept.push(p.clone());
            }
        }
        Ok(kept)
    }

    /// Gives a partition up (a clean stop), so another instance can take it without waiting for
    /// the ownership to expire.
    async fn release(&self, me: &str, partition: &str, version: i64) -> Result<(), StoreError> {
        let s = &self.scope;
        self.client()
            .await?
            .execute(
                "UPDATE iomt_eventhubs_ownership SET owner_id = '', last_modified = now()
                 WHERE namespace = $1 AND hub = $2 AND consumer_group = $3 AND partition_id = $4
                   AND owner_id = $5 AND version = $6",
                &[&s.namespace, &s.hub, &s.consumer_group, &partition, &me, &version],
            )
            .await?;
        Ok(())
    }

    async fn checkpoint(&self, partition: &str) -> Result<Option<Checkpoint>, StoreError> {
        let s = &self.scope;
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT \"offset\", sequence_number, enqueued_time FROM iomt_eventhubs_checkpoint
                 WHERE namespace = $1 AND hub = $2 AND consumer_group = $3 AND partition_id = $4",
                &[&s.namespace, &s.hub, &s.consumer_group, &partition],
            )
            .await?;
        Ok(row.map(|r| Checkpoint { offset: r.get(0), sequence_number: r.get(1), enqueued_time: r.get(2) }))
    }

    /// Moves a partition's checkpoint forward, only while `me` owns it at `version` and only
    /// forward: a stale owner's late write can neither move it back nor move it at all. `false`
    /// when it was not written for either reason.
    async fn set_checkpoint(
        &self,
        me: &str,
        version: i64,
        partition: &str,
        c: &Checkpoint,
    ) -> Result<bool, StoreError> {
        let s = &self.scope;
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO iomt_eventhubs_checkpoint AS c
                     (namespace, hub, consumer_group, partition_id, \"offset\", sequence_number, enqueued_time, owner_id, updated)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, now()
                 WHERE EXISTS (SELECT 1 FROM iomt_eventhubs_ownership o
                               WHERE o.namespace = $1 AND o.hub = $2 AND o.consumer_group = $3
                                 AND o.partition_id = $4 AND o.owner_id = $8 AND o.version = $9)
                 ON CONFLICT (namespace, hub, consumer_group, partition_id) DO UPDATE
                     SET \"offset\" = EXCLUDED.\"offset\", sequence_number = EXCLUDED.sequence_number,
                         enqueued_time = EXCLUDED.enqueued_time, owner_id = EXCLUDED.owner_id, updated = now()
                     WHERE c.sequence_number < EXCLUDED.sequence_number",
                &[
                    &s.namespace,
                    &s.hub,
                    &s.consumer_group,
                    &partition,
                    &c.offset,
                    &c.sequence_number,
                    &c.enqueued_time,
                    &me,
                    &version,
                ],
            )
            .await?;
        Ok(n == 1)
    }
}

/// The dead letters `dead-letters redrive` has sent back, by where they sit in the dead-letter
/// hub. Events cannot be taken out of a hub, so this record is what keeps `list` from showing a
/// redriven one and a second redrive from sending it again.
const REDRIVEN_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS iomt_eventhubs_redriven (
    namespace text NOT NULL, hub text NOT NULL, partition_id text NOT NULL, sequence_number bigint NOT NULL,
    sent_to text NOT NULL, redriven timestamptz NOT NULL,
    PRIMARY KEY (namespace, hub, partition_id, sequence_number));
";

/// The redriven dead letters of one dead-letter hub, in the checkpoint store `eventhubs.checkpoint_store` names.
pub enum Redriven {
    Postgres(PgRedriven),
    Blob(super::blobstore::BlobRedriven),
}

impl Redriven {
    pub async fn open(s: &EventHubs, dead_letter_hub: &str) -> Result<Redriven, StoreError> {
        Ok(match s.checkpoint_store {
            CheckpointStoreKind::Postgres => {
                if s.checkpoint_postgres_url.is_empty() {
                    return Err(StoreError::Setting {
                        key: "eventhubs.checkpoint_postgres_url",
                        message: "is not set: the redriven dead letters are recorded in the connector's PostgreSQL checkpoint store".into(),
                    });
                }
                Redriven::Postgres(
                    PgRedriven::open(&s.checkpoint_postgres_url, &s.namespace_host(), dead_letter_hub).await?,
                )
            }
            CheckpointStoreKind::Blob => {
                Redriven::Blob(super::blobstore::BlobRedriven::open(s, dead_letter_hub).await?)
            }
        })
    }

    /// The sequence numbers from `from` to `to` (inclusive) of a partition's redriven dead letters.
    pub async fn of_partition(
        &self,
        partition: &str,
        from: i64,
        to: i64,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        match self {
            Redriven::Postgres(r) => r.of_partition(partition, from, to).await,
            Redriven::Blob(r) => r.of_partition(partition, from, to).await,
        }
    }

    /// Records a dead letter as sent back to `sent_to` (again: already recorded is no error).
    pub async fn record(&self, partition: &str, sequence_number: i64, sent_to: &str) -> Result<(), StoreError> {
        match self {
            Redriven::Postgres(r) => r.record(partition, sequence_number, sent_to).await,
            Redriven::Blob(r) => r.record(partition, sequence_number, sent_to).await,
        }
    }
}

/// The redriven dead letters of one dead-letter hub (`iomt_eventhubs_redriven`).
pub struct PgRedriven {
    client: Client,
    namespace: String,
    hub: String,
}

impl PgRedriven {
    /// Connects and creates the table if it is missing.
    pub async fn open(url: &str, namespace: &str, dead_letter_hub: &str) -> Result<PgRedriven, StoreError> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        // The command line runs on a plain tokio runtime, not on an actix arbiter.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "checkpoint store connection ended");
            }
        });
        client.batch_execute(REDRIVEN_SCHEMA).await?;
        Ok(PgRedriven { client, namespace: namespace.to_string(), hub: dead_letter_hub.to_string() })
    }

    /// The sequence numbers from `from` to `to` (inclusive) of a partition's redriven dead letters.
    pub async fn of_partition(
        &self,
        partition: &str,
        from: i64,
        to: i64,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT sequence_number FROM iomt_eventhubs_redriven
                 WHERE namespace = $1 AND hub = $2 AND partition_id = $3 AND sequence_number BETWEEN $4 AND $5",
                &[&self.namespace, &self.hub, &partition, &from, &to],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records a dead letter as sent back to `sent_to` (again: already recorded is no error).
    pub async fn record(&self, partition: &str, sequence_number: i64, sent_to: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                "INSERT INTO iomt_eventhubs_redriven (namespace, hub, partition_id, sequence_number, sent_to, redriven)
                 VALUES ($1, $2, $3, $4, $5, now()) ON CONFLICT DO NOTHING",
                &[&self.namespace, &self.hub, &partition, &sequence_number, &sent_to],
            )
            .await?;
        Ok(())
    }
}
