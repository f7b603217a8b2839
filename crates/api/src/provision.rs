//! `Provision`: turning a request for instances into `requested` rows and
//! the `CMD.provision` commands that make the scheduler act on them.
//!
//! Design notes: everything that can refuse the request is checked before
//! the first write, so a refused batch leaves no trace. An accepted batch is
//! one transaction: the instance rows (each with its action log and
//! `EVT.instance.requested` event), the commands in the outbox, and the
//! idempotency record holding the answer. Once it commits the relay carries
//! the commands to JetStream, so the answer "OK" is never a promise the
//! system can forget. A pool with a spend cap is checked in that same
//! transaction, under its row lock (`flotilla_store::spend`): a batch that
//! would take the pool's spend over its cap is refused, RESOURCE_EXHAUSTED
//! with the figures, and two batches racing on one pool cannot together
//! pass it. Two requests racing with one key both try to commit;
//! the loser fails on the record's primary key or on an instance name the
//! winner took (at the name check or at insert), rolls back everything, and
//! answers with the winner's stored response, so a key yields exactly one
//! batch.
//!
//! A pool with warm stock (see `flotilla_store::warm`) serves the batch
//! from it first, in the same transaction: each warm instance taken gets
//! the name, labels and idempotency key the batch would have given a fresh
//! one, and moves `warm` → `provisioning`, so the answer carries its id
//! and that state (what is true: its machine exists, its start is under
//! way). The rest of the batch is created cold as before. A warm instance
//! costs nothing against the spend cap until it is taken, so the cap
//! check counts the whole batch either way.

use std::collections::{BTreeMap, HashMap, HashSet};

use flotilla_core::InstanceId;
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_store::fleet::fleet_names_in_use;
use flotilla_store::idempotency::{IdempotencyRecord, idempotency_get, idempotency_put};
use flotilla_store::instance::{NewInstance, instance_insert_with_provision};
use flotilla_store::pool::pool_get;
use flotilla_store::pool_delete::deleting_refusal;
use flotilla_store::spend::spend_room;
use flotilla_store::warm::{WarmTake, warm_take};
use flotilla_store::{StoreError, WriteCtx};
use prost::Message;
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use tonic::Status;

use crate::ApiState;
use crate::error::{pool_not_found, store_status};
use crate::validate;

/// Idempotency scope of Provision keys.
pub const SCOPE: &str = "provision";
/// Random suffix length of generated names: 36^8 makes a clash with a live
/// name in the same pool practically impossible, and the unique index
/// catches the rest.
const SUFFIX_LEN: usize = 8;

/// How the request names its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Naming {
    Given(Vec<String>),
    Count(u32),
}

/// A request that passed every check that needs no database.
#[derive(Debug, Clone)]
struct Checked {
    pool: String,
    naming: Naming,
    labels: BTreeMap<String, String>,
    key: Option<String>,
}

fn check(req: &v1::ProvisionRequest, max: u32) -> Result<Checked, Status> {
    if req.pool.is_empty() {
        return Err(invalid_field("pool", "required"));
    }
    validate::name("pool", &req.pool).map_err(|_| invalid_field("pool", "no such pool"))?;
    let naming = if req.names.is_empty() {
        if req.count == 0 || req.count > max {
            return Err(invalid_field("count", format!("must be 1 to {max}")));
        }
        Naming::Count(req.count)
    } else {
        if req.names.len() > max as usize {
            return Err(invalid_field("names", format!("at most {max} names")));
        }
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(req.names.len());
        for (i, n) in req.names.iter().enumerate() {
            let field = format!("names[{i}]");
            validate::name(&field, n)?;
            if let Some(first) = seen.insert(n.as_str(), i) {
                return Err(invalid_field(
                    &field,
                    format!("{n:?} is also names[{first}]; names must be unique"),
                ));
            }
        }
        Naming::Given(req.names.clone())
    };
    Ok(Checked {
        pool: req.pool.clone(),
        naming,
        labels: validate::labels("labels", &req.labels)?,
        key: validate::idempotency_key(&req.idempotency_key)?,
    })
}

/// What identifies "the same request" for an idempotency key: every field.
/// Protobuf map order is unspecified (prost iterates a `HashMap`), so the
/// labels are hashed sorted, after the rest of the message.
pub fn request_hash(req: &v1::ProvisionRequest) -> Vec<u8> {
    let rest = v1::ProvisionRequest {
        labels: HashMap::new(),
        ..req.clone()
    };
    let mut h = Sha256::new();
    h.update(rest.encode_to_vec());
    let sorted: BTreeMap<&String, &String> = req.labels.iter().collect();
    for (k, v) in sorted {
        for part in [k, v] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    h.finalize().to_vec()
}

/// `<pool>-<8 random [a-z0-9]>`, the pool part shortened so the name stays
/// within 63 characters.
fn generated_names(pool: &str, count: u32) -> Vec<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let prefix = pool.get(..63 - 1 - SUFFIX_LEN).unwrap_or(pool);
    let prefix = prefix.trim_end_matches('-');
    let mut rng = rand::rng();
    let mut seen = HashSet::with_capacity(count as usize);
    let mut names = Vec::with_capacity(count as usize);
    while names.len() < count as usize {
        let suffix: String = (0..SUFFIX_LEN)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        let name = format!("{prefix}-{suffix}");
        if seen.insert(name.clone()) {
            names.push(name);
        }
    }
    names
}

/// The stored answer to a key, or FAILED_PRECONDITION when the key came
/// with a different request.
fn replay(record: IdempotencyRecord, hash: &[u8]) -> Result<v1::ProvisionResponse, Status> {
    if record.request_hash != hash {
        return Err(Status::failed_precondition(
            "idempotency_key: reused with a different request",
        ));
    }
    let mut answer = v1::ProvisionResponse::decode(record.response.as_slice()).map_err(|e| {
        tracing::error!(error = %e, "stored provision answer does not decode");
        Status::internal("internal error")
    })?;
    answer.replayed = true;
    Ok(answer)
}

/// Handles one Provision call for `ctx.actor`.
pub async fn provision(
    state: &ApiState,
    ctx: WriteCtx,
    req: v1::ProvisionRequest,
) -> Result<v1::ProvisionResponse, Status> {
    let checked = check(&req, state.limits.max_provision_count)?;
    let hash = request_hash(&req);
    let mut conn = state.pool.acquire().await.map_err(db_status)?;

    // Before the name checks: a retry of an accepted request would find its
    // own names taken. A dry run neither replays nor records an answer.
    let key = checked.key.as_deref().filter(|_| !req.dry_run);
    if let Some(answer) = recorded(&mut conn, key, &hash).await? {
        return Ok(answer);
    }

    let pool = pool_get(&mut conn, &checked.pool)
        .await
        .map_err(store_status)?
        .ok_or_else(|| pool_not_found(&checked.pool))?;
    // Checked again under the pool's lock when the rows are written, which
    // is what decides a race with the deletion.
    if pool.deleting_since.is_some() {
        return Err(Status::failed_precondition(deleting_refusal(&pool.name)));
    }
    let names = match &checked.naming {
        Naming::Given(names) => {
            if let Err(taken) = check_names_free(&mut conn, &pool.name, names).await {
                // A request with the same key may have committed these very
                // names since the lookup above: then its answer is ours.
                return match recorded(&mut conn, key, &hash).await? {
                    Some(answer) => Ok(answer),
                    None => Err(taken),
                };
            }
            names.clone()
        }
        Naming::Count(n) => generated_names(&pool.name, *n),
    };
    let new: Vec<NewInstance> = names
        .into_iter()
        .map(|name| NewInstance {
            id: InstanceId::new(),
            pool: pool.name.clone(),
            name,
            provider: pool.provider.clone(),
            labels: checked.labels.clone(),
            idempotency_key: checked.key.clone(),
            worker_token_hash: None,
        })
        .collect();

    if req.dry_run {
        // Outside a transaction (any lock lasts one statement): a dry run
        // writes nothing, so it only says whether the batch fits now.
        let room = spend_room(&mut conn, &pool.name, &state.limits.prices)
            .await
            .map_err(store_status)?;
        if !room.admits(new.len() as i64) {
            return Err(Status::resource_exhausted(
                room.refusal(&pool.name, new.len() as i64),
            ));
        }
        return Ok(v1::ProvisionResponse {
            instances: new.iter().map(would_be).collect(),
            dry_run: true,
            replayed: false,
        });
    }
    drop(conn);

    match write(state, &ctx, &pool.name, &new, key, &hash).await {
        Ok((answer, warm)) => {
            metrics::counter!("flotilla_api_instances_requested_total").increment(new.len() as u64);
            metrics::counter!("flotilla_api_instances_provisioned_total", "source" => "warm")
                .increment(warm as u64);
            metrics::counter!("flotilla_api_instances_provisioned_total", "source" => "cold")
                .increment((new.len() - warm) as u64);
            if warm > 0 {
                tracing::info!(pool = %pool.name, warm, cold = new.len() - warm, "provision served from warm stock first");
            }
            Ok(answer)
        }
        Err(lost) => {
            // A write that failed with a key may have lost a race to a
            // request with the same key: that request's answer is ours.
            let mut conn = state.pool.acquire().await.map_err(db_status)?;
            if let Some(answer) = recorded(&mut conn, key, &hash).await? {
                return Ok(answer);
            }
            Err(match lost {
                // Deleted since it was read.
                WriteError::Store(StoreError::NotFound(_)) => pool_not_found(&pool.name),
                WriteError::Store(e) => store_status(e),
                WriteError::KeyTaken => {
                    Status::aborted("idempotency_key: taken concurrently; retry")
                }
                WriteError::OverSpendCap(why) => {
                    metrics::counter!("flotilla_api_spend_cap_refusals_total", "pool" => pool.name.clone())
                        .increment(1);
                    tracing::info!(pool = %pool.name, %why, "provision refused by the spend cap");
                    Status::resource_exhausted(why)
                }
            })
        }
    }
}

/// The answer recorded for `key`, if any (FAILED_PRECONDITION when the key
/// was recorded for a different request).
async fn recorded(
    conn: &mut PgConnection,
    key: Option<&str>,
    hash: &[u8],
) -> Result<Option<v1::ProvisionResponse>, Status> {
    let Some(key) = key else { return Ok(None) };
    match idempotency_get(conn, SCOPE, key)
        .await
        .map_err(store_status)?
    {
        Some(record) => replay(record, hash).map(Some),
        None => Ok(None),
    }
}

/// Refuses the first name a live instance of the pool already uses, as
/// ALREADY_EXISTS (the request is well formed: what it would create
/// exists), naming the field.
async fn check_names_free(
    conn: &mut PgConnection,
    pool: &str,
    names: &[String],
) -> Result<(), Status> {
    let used: HashSet<String> = fleet_names_in_use(conn, pool, names)
        .await
        .map_err(store_status)?
        .into_iter()
        .collect();
    match names.iter().position(|n| used.contains(n)) {
        Some(i) => Err(Status::already_exists(format!(
            "names[{i}]: {:?} is used by a live instance of pool {pool}",
            names[i]
        ))),
        None => Ok(()),
    }
}

enum WriteError {
    Store(StoreError),
    /// The idempotency record was inserted by someone else first.
    KeyTaken,
    /// The batch would take the pool's spend over its cap; the figures.
    OverSpendCap(String),
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        WriteError::Store(e)
    }
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        WriteError::Store(e.into())
    }
}

/// The one transaction of an accepted batch, and how many of its
/// instances came from warm stock. Dropping the transaction on an early
/// return rolls all of it back.
async fn write(
    state: &ApiState,
    ctx: &WriteCtx,
    pool: &str,
    new: &[NewInstance],
    key: Option<&str>,
    hash: &[u8],
) -> Result<(v1::ProvisionResponse, usize), WriteError> {
    let mut tx = state.pool.begin().await?;
    // Before the insert and under the pool's lock (when it has a cap), so
    // the count includes every batch committed before this one.
    let room = spend_room(&mut tx, pool, &state.limits.prices).await?;
    let n = new.len() as i64;
    if !room.admits(n) {
        return Err(WriteError::OverSpendCap(room.refusal(pool, n)));
    }
    // Warm stock first: the i-th taken gets the i-th name.
    let takes: Vec<WarmTake> = new
        .iter()
        .map(|n| WarmTake {
            name: n.name.clone(),
            labels: n.labels.clone(),
            idempotency_key: n.idempotency_key.clone(),
        })
        .collect();
    let mut rows = warm_take(&mut tx, ctx, pool, &takes).await?;
    let warm = rows.len();
    let cold = &new[warm..];
    let mut created = instance_insert_with_provision(&mut tx, ctx, cold).await?;

    let position: HashMap<InstanceId, usize> =
        cold.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    created.sort_by_key(|r| position.get(&r.id).copied().unwrap_or(usize::MAX));
    rows.extend(created);
    let answer = v1::ProvisionResponse {
        instances: rows.iter().map(|r| r.to_proto()).collect(),
        dry_run: false,
        replayed: false,
    };
    if let Some(key) = key {
        let ttl = state.limits.idempotency_ttl;
        if !idempotency_put(&mut tx, SCOPE, key, hash, &answer.encode_to_vec(), ttl).await? {
            return Err(WriteError::KeyTaken);
        }
    }
    tx.commit().await?;
    Ok((answer, warm))
}

/// What a dry run reports for an instance it did not create.
fn would_be(n: &NewInstance) -> v1::Instance {
    v1::Instance {
        id: n.id.to_string(),
        pool: n.pool.clone(),
        name: n.name.clone(),
        provider: n.provider.clone(),
        state: v1::InstanceState::Requested as i32,
        desired_state: v1::DesiredState::Running as i32,
        labels: n.labels.clone().into_iter().collect(),
        ..Default::default()
    }
}

fn db_status(e: sqlx::Error) -> Status {
    store_status(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> v1::ProvisionRequest {
        v1::ProvisionRequest {
            pool: "gpu".into(),
            count: 3,
            ..Default::default()
        }
    }

    fn field_of(r: Result<Checked, Status>) -> String {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        s.message().split(':').next().unwrap_or_default().to_owned()
    }

    #[test]
    fn count_is_bounded_only_when_no_names_are_given() {
        assert_eq!(check(&req(), 10).expect("ok").naming, Naming::Count(3));
        for count in [0, 11] {
            assert_eq!(
                field_of(check(&v1::ProvisionRequest { count, ..req() }, 10)),
                "count"
            );
        }
        let named = v1::ProvisionRequest {
            count: 0,
            names: vec!["a".into(), "b".into()],
            ..req()
        };
        assert!(check(&named, 10).is_ok());
        assert_eq!(field_of(check(&named, 1)), "names");
    }

    #[test]
    fn a_repeated_name_is_refused_at_its_second_position() {
        let r = v1::ProvisionRequest {
            names: vec!["a".into(), "b".into(), "c".into(), "b".into()],
            ..req()
        };
        assert_eq!(field_of(check(&r, 10)), "names[3]");
        let bad = v1::ProvisionRequest {
            names: vec!["a".into(), "B".into()],
            ..req()
        };
        assert_eq!(field_of(check(&bad, 10)), "names[1]");
    }

    #[test]
    fn pool_and_key_are_named_when_bad() {
        assert_eq!(
            field_of(check(
                &v1::ProvisionRequest {
                    pool: String::new(),
                    ..req()
                },
                10
            )),
            "pool"
        );
        assert_eq!(
            field_of(check(
                &v1::ProvisionRequest {
                    pool: "Gpu".into(),
                    ..req()
                },
                10
            )),
            "pool"
        );
        let key = v1::ProvisionRequest {
            idempotency_key: "k".repeat(129),
            ..req()
        };
        assert_eq!(field_of(check(&key, 10)), "idempotency_key");
    }

    #[test]
    fn the_request_hash_ignores_label_order_but_not_content() {
        let labels: Vec<(String, String)> = (0..20)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect();
        let a = v1::ProvisionRequest {
            labels: labels.iter().cloned().collect(),
            ..req()
        };
        let b = v1::ProvisionRequest {
            labels: labels.iter().rev().cloned().collect(),
            ..req()
        };
        assert_eq!(request_hash(&a), request_hash(&b));
        let c = v1::ProvisionRequest {
            count: 4,
            ..a.clone()
        };
        assert_ne!(request_hash(&a), request_hash(&c));
        let mut d = a.clone();
        d.labels.insert("k0".into(), "other".into());
        assert_ne!(request_hash(&a), request_hash(&d));
    }

    #[test]
    fn generated_names_are_unique_valid_and_prefixed_by_the_pool() {
        let names = generated_names("gpu", 500);
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 500);
        for n in &names {
            assert!(n.starts_with("gpu-") && n.len() == 12, "{n}");
            assert!(validate::name("n", n).is_ok(), "{n}");
        }
        let long = format!("p{}", "-".repeat(60));
        for n in generated_names(&long, 5) {
            assert!(validate::name("n", &n).is_ok(), "{n}");
        }
    }
}
