//! Instance volumes: what was created at the provider for an instance, and
//! whether it is gone yet.

use chrono::{DateTime, Utc};
use flotilla_core::InstanceId;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VolumeRow {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub provider_volume_id: Option<String>,
    pub size_gb: i32,
    pub delete_on_terminate: bool,
    /// requested, created, deleting, deleted
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// Volumes of an instance that still have to be deleted at the provider.
pub async fn volume_pending_delete(
    conn: &mut PgConnection,
    instance: InstanceId,
) -> Result<Vec<VolumeRow>> {
    Ok(sqlx::query_as(
        "SELECT id, instance_id, provider_volume_id, size_gb, delete_on_terminate, state,
                attempts, next_attempt_at, last_error
         FROM instance_volumes
         WHERE instance_id = $1 AND delete_on_terminate AND state <> 'deleted'
         ORDER BY id",
    )
    .bind(instance.0)
    .fetch_all(conn)
    .await?)
}

/// Records a volume an earlier attempt created (found by its ownership
/// tag) as the instance's, with a `volume_adopted` row in the instance's
/// history, in one (nested) transaction.
pub async fn volume_record_adopted(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    instance: InstanceId,
    provider_volume_id: &str,
    size_gb: i32,
) -> Result<VolumeRow> {
    let mut tx = conn.begin().await?;
    let row = volume_record_created(&mut tx, instance, provider_volume_id, size_gb).await?;
    crate::action_log::action_log_request(
        &mut tx,
        ctx,
        &[instance.0],
        crate::action_log::Request::VolumeAdopted,
        &format!(
            "volume {provider_volume_id} found by its ownership tag (an earlier attempt created \
             it); recorded instead of creating another"
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// Records a volume created at the provider.
pub async fn volume_record_created(
    conn: &mut PgConnection,
    instance: InstanceId,
    provider_volume_id: &str,
    size_gb: i32,
) -> Result<VolumeRow> {
    Ok(sqlx::query_as(
        "INSERT INTO instance_volumes (id, instance_id, provider_volume_id, size_gb, state)
         VALUES ($1, $2, $3, $4, 'created')
         RETURNING id, instance_id, provider_volume_id, size_gb, delete_on_terminate, state,
                   attempts, next_attempt_at, last_error",
    )
    .bind(Uuid::now_v7())
    .bind(instance.0)
    .bind(provider_volume_id)
    .bind(size_gb)
    .fetch_one(conn)
    .await?)
}

/// The provider confirmed the volume gone (deleted, or 404).
pub async fn volume_mark_deleted(conn: &mut PgConnection, id: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE instance_volumes SET state = 'deleted', last_error = NULL, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A delete attempt failed (e.g. still bound to a machine being destroyed).
/// A volume already confirmed deleted stays so: the failure may be the late
/// answer of a replica that was paused mid-call while another finished the
/// teardown, and `deleted` is what the provider confirmed.
pub async fn volume_record_failure(conn: &mut PgConnection, id: Uuid, error: &str) -> Result<()> {
    sqlx::query(
        "UPDATE instance_volumes SET state = 'deleting', attempts = attempts + 1,
             last_error = $2, updated_at = now()
         WHERE id = $1 AND state <> 'deleted'",
    )
    .bind(id)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// The volume already recorded for an instance that still exists at the
/// provider, if any: a retried provisioning step reuses it.
pub async fn volume_of_instance(
    conn: &mut PgConnection,
    instance: InstanceId,
) -> Result<Option<VolumeRow>> {
    Ok(sqlx::query_as(
        "SELECT id, instance_id, provider_volume_id, size_gb, delete_on_terminate, state,
                attempts, next_attempt_at, last_error
         FROM instance_volumes
         WHERE instance_id = $1 AND provider_volume_id IS NOT NULL
           AND state IN ('requested', 'created')
         ORDER BY id LIMIT 1",
    )
    .bind(instance.0)
    .fetch_optional(conn)
    .await?)
}

/// Provider ids of an instance's volumes not known to be deleted: what may
/// be left of it at the provider besides its machine.
pub async fn volume_ids_left(conn: &mut PgConnection, instance: InstanceId) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT provider_volume_id FROM instance_volumes
         WHERE instance_id = $1 AND provider_volume_id IS NOT NULL AND state <> 'deleted'
         ORDER BY created_at",
    )
    .bind(instance.0)
    .fetch_all(conn)
    .await?)
}
