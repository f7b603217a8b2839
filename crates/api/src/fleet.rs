//! The public `FleetService`: instances and pools as platform teams and the
//! CLI see them. Callers were authenticated, and their scope checked, by
//! [`crate::auth::FleetAuth`] before any handler here runs; each handler
//! validates its input before its first read or write.

use flotilla_bus::subjects::{PROVISION, RECONCILE};
use flotilla_core::InstanceState;
use flotilla_core::price::PriceTable;
use flotilla_proto::client::AdapterClient;
use flotilla_proto::convert::state_from_wire;
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_server::FleetService;
use flotilla_store::WriteCtx;
use flotilla_store::action_log::action_log_for_instance;
use flotilla_store::disruption::disruption_counts;
use flotilla_store::instance::{ListFilter, instance_get, instance_list};
use flotilla_store::outbox::outbox_insert;
use flotilla_store::pool::NewPool;
use flotilla_store::pool::{PoolRow, PoolUpdate, pool_create, pool_get, pool_list, pool_update};
use flotilla_store::pool_pause::{pool_events_recent, pool_pause, pool_resume};
use flotilla_store::spend::{spend_live_counts, spend_rate};
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::grpc::{correlation_of, outgoing};
use flotilla_telemetry::propagation::current_trace_headers;
use prost::Message;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres, Transaction};
use tonic::{Request, Response, Status};

use crate::error::{pool_not_found, store_status};
use crate::watch::{EventStream, watch};
use crate::{ApiState, auth, provision, validate};

/// Page size when the caller asks for none.
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Acts on a pool `GetPool` returns (the most recent ones).
const RECENT_POOL_EVENTS: i64 = 20;

#[derive(Debug, Clone)]
pub struct FleetApi {
    state: ApiState,
    /// Ends open watch streams, so they never hold a graceful shutdown open.
    shutdown: CancellationToken,
}

impl FleetApi {
    pub fn new(state: ApiState, shutdown: CancellationToken) -> Self {
        FleetApi { state, shutdown }
    }

    async fn conn(&self) -> Result<PoolConnection<Postgres>, Status> {
        self.state
            .pool
            .acquire()
            .await
            .map_err(|e| store_status(e.into()))
    }

    /// NOT_FOUND unless `name` is a pool.
    async fn pool_exists(&self, conn: &mut PgConnection, name: &str) -> Result<(), Status> {
        match pool_get(conn, name).await.map_err(store_status)? {
            Some(_) => Ok(()),
            None => Err(pool_not_found(name)),
        }
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, Status> {
        self.state
            .pool
            .begin()
            .await
            .map_err(|e| store_status(e.into()))
    }
}

/// Who writes, on whose behalf, under which trace: for action logs and the
/// headers of every message the write queues.
fn write_ctx<T>(req: &Request<T>) -> Result<WriteCtx, Status> {
    let caller = auth::caller(req)?;
    Ok(WriteCtx::new(caller.actor())
        .with_correlation(correlation_of(req.metadata()))
        .with_trace_headers(current_trace_headers()))
}

/// Asks the provider-adapter whether machines of the new pool's shape could
/// be created (its `CheckSpec`), before anything is written. A refusal
/// comes back naming the pool's field; an adapter that cannot answer fails
/// the call (UNAVAILABLE, retry), because a pool that was never checked
/// would only fail later, at its first create.
async fn check_with_adapter(
    provider: &AdapterClient,
    new: &NewPool,
    cid: &flotilla_core::CorrelationId,
) -> Result<(), Status> {
    let req = v1::CheckSpecRequest {
        target: Some(v1::ProviderTarget {
            provider: new.provider.clone(),
            pool: new.name.clone(),
            region: new.region.clone(),
        }),
        instance_type: new.instance_type.clone(),
        image: new.image.clone(),
        volume_size_gb: u32::try_from(new.volume_size_gb).unwrap_or(0),
    };
    match provider.clone().check_spec(outgoing(req, cid)).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            let (field, why) = s.message().split_once(": ").unwrap_or(("", s.message()));
            let field = field.strip_prefix("target.").unwrap_or(field);
            let known = [
                "provider",
                "region",
                "instance_type",
                "image",
                "volume_size_gb",
            ];
            if known.contains(&field) {
                Err(invalid_field(&format!("pool.{field}"), why))
            } else {
                Err(invalid_field("pool", s.message()))
            }
        }
        Err(s) => {
            tracing::warn!(pool = %new.name, code = ?s.code(), error = s.message(), "pool not checked: the provider-adapter did not answer");
            Err(Status::unavailable(format!(
                "the pool could not be checked against the provider-adapter: {}",
                s.message()
            )))
        }
    }
}

/// A pool as callers see it: its row, what its `live` instances cost per
/// hour now, and how many of them are being voluntarily `disrupted`.
pub(crate) fn pool_answer(
    row: &PoolRow,
    prices: &PriceTable,
    live: i64,
    disrupted: i64,
) -> v1::Pool {
    v1::Pool {
        spend_per_hour_micros: spend_rate(row, prices, live).max(0) as u64,
        disrupted: u32::try_from(disrupted.max(0)).unwrap_or(u32::MAX),
        ..row.to_proto()
    }
}

impl FleetApi {
    /// [`pool_answer`] for one pool, counting its live instances on `conn`.
    async fn answer_one(&self, conn: &mut PgConnection, row: &PoolRow) -> Result<v1::Pool, Status> {
        let live = spend_live_counts(conn, Some(&row.name))
            .await
            .map_err(store_status)?
            .get(&row.name)
            .copied()
            .unwrap_or(0);
        let disrupted = disruption_counts(conn, Some(&row.name))
            .await
            .map_err(store_status)?
            .get(&row.name)
            .copied()
            .unwrap_or(0);
        Ok(pool_answer(row, &self.state.limits.prices, live, disrupted))
    }
}

fn not_found(what: &str, name: &str) -> Status {
    Status::not_found(format!("{what} {name} does not exist"))
}

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn provision(
        &self,
        request: Request<v1::ProvisionRequest>,
    ) -> Result<Response<v1::ProvisionResponse>, Status> {
        let ctx = write_ctx(&request)?;
        let answer = provision::provision(&self.state, ctx, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn terminate(
        &self,
        request: Request<v1::TerminateRequest>,
    ) -> Result<Response<v1::TerminateResponse>, Status> {
        let ctx = write_ctx(&request)?;
        let answer = crate::lifecycle::terminate(&self.state, ctx, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let ctx = write_ctx(&request)?;
        let answer = crate::lifecycle::drain(&self.state, ctx, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn uncordon(
        &self,
        request: Request<v1::UncordonRequest>,
    ) -> Result<Response<v1::UncordonResponse>, Status> {
        let ctx = write_ctx(&request)?;
        let answer = crate::lifecycle::uncordon(&self.state, ctx, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn get_instance(
        &self,
        request: Request<v1::GetInstanceRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        let id = validate::instance_id("id", &request.get_ref().id)?;
        let mut conn = self.conn().await?;
        let row = instance_get(&mut conn, id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| not_found("instance", &id.to_string()))?;
        Ok(Response::new(row.to_proto()))
    }

    async fn list_instances(
        &self,
        request: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            _ => {
                return Err(invalid_field(
                    "page_size",
                    format!("at most {MAX_PAGE_SIZE}"),
                ));
            }
        } as usize;
        let pool = if req.pool.is_empty() {
            None
        } else {
            validate::name("pool", &req.pool)?;
            Some(req.pool)
        };
        let mut conn = self.conn().await?;
        if let Some(pool) = &pool {
            self.pool_exists(&mut conn, pool).await?;
        }
        let states = req
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                state_from_wire(*s)
                    .map_err(|_| invalid_field(&format!("states[{i}]"), "unknown state"))
            })
            .collect::<Result<Vec<InstanceState>, _>>()?;
        let labels = validate::labels("labels", &req.labels)?;
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(
                req.page_token
                    .parse()
                    .map_err(|_| invalid_field("page_token", "not a token from a previous page"))?,
            )
        };
        let filter = ListFilter {
            pool,
            states,
            labels,
            cordoned: req.cordoned,
            after,
            // One more than asked tells whether another page follows.
            limit: page_size as i64 + 1,
        };
        let mut rows = instance_list(&mut conn, &filter)
            .await
            .map_err(store_status)?;
        let next_page_token = if rows.len() > page_size {
            rows.truncate(page_size);
            rows.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListInstancesResponse {
            instances: rows.iter().map(|r| r.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn get_instance_history(
        &self,
        request: Request<v1::GetInstanceHistoryRequest>,
    ) -> Result<Response<v1::GetInstanceHistoryResponse>, Status> {
        let id = validate::instance_id("id", &request.get_ref().id)?;
        let mut conn = self.conn().await?;
        if instance_get(&mut conn, id)
            .await
            .map_err(store_status)?
            .is_none()
        {
            return Err(not_found("instance", &id.to_string()));
        }
        let entries = action_log_for_instance(&mut conn, id.0)
            .await
            .map_err(store_status)?
            .iter()
            .map(|row| row.to_proto().map_err(store_status))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(v1::GetInstanceHistoryResponse { entries }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let pool = &request.get_ref().pool;
        if !pool.is_empty() {
            validate::name("pool", pool)?;
            let mut conn = self.conn().await?;
            self.pool_exists(&mut conn, pool).await?;
        }
        let stream = watch(
            &self.state.bus,
            self.shutdown.child_token(),
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn create_pool(
        &self,
        request: Request<v1::CreatePoolRequest>,
    ) -> Result<Response<v1::Pool>, Status> {
        let actor = auth::caller(&request)?.actor();
        let new = validate::new_pool(request.get_ref().pool.as_ref())?;
        let mut conn = self.conn().await?;
        // A name already taken is answered as before (ALREADY_EXISTS, from
        // the insert below), whatever the adapter would say of the shape.
        if let Some(provider) = &self.state.provider
            && pool_get(&mut conn, &new.name)
                .await
                .map_err(store_status)?
                .is_none()
        {
            check_with_adapter(provider, &new, &correlation_of(request.metadata())).await?;
        }
        let row = pool_create(&mut conn, &new).await.map_err(store_status)?;
        tracing::info!(pool = %row.name, %actor, "pool created");
        Ok(Response::new(self.answer_one(&mut conn, &row).await?))
    }

    async fn update_pool(
        &self,
        request: Request<v1::UpdatePoolRequest>,
    ) -> Result<Response<v1::Pool>, Status> {
        let ctx = write_ctx(&request)?;
        let req = request.into_inner();
        validate::name("name", &req.name)?;
        let update = PoolUpdate {
            desired_capacity: req
                .desired_capacity
                .map(|v| validate::desired_capacity("desired_capacity", v))
                .transpose()?,
            timeouts: req
                .timeouts
                .as_ref()
                .map(|t| validate::timeouts("timeouts", t))
                .transpose()?,
            price_per_hour_micros: req
                .price_per_hour_micros
                .map(|p| validate::price("price_per_hour_micros", p))
                .transpose()?,
            health_check_url: req
                .health_check_url
                .as_deref()
                .map(|u| validate::health_check_url("health_check_url", u))
                .transpose()?,
            spend_cap_per_hour_micros: req
                .spend_cap_per_hour_micros
                .map(|c| validate::spend_cap("spend_cap_per_hour_micros", c))
                .transpose()?,
            disruption_budget: req
                .disruption_budget
                .as_deref()
                .map(|b| validate::disruption_budget("disruption_budget", b))
                .transpose()?,
            max_lifetime_seconds: req
                .max_lifetime_seconds
                .map(|s| validate::lifetime("max_lifetime_seconds", s))
                .transpose()?,
            idle_timeout_seconds: req
                .idle_timeout_seconds
                .map(|s| validate::lifetime("idle_timeout_seconds", s))
                .transpose()?,
            idle_action: req
                .idle_action
                .as_deref()
                .map(|a| validate::idle_action("idle_action", a))
                .transpose()?,
            warm_size: req
                .warm_size
                .map(|w| validate::warm_size("warm_size", w))
                .transpose()?,
        };
        let expected_version = match req.expected_version {
            0 => None,
            v => {
                Some(i64::try_from(v).map_err(|_| invalid_field("expected_version", "too large"))?)
            }
        };

        let mut tx = self.begin().await?;
        // A pool being deleted keeps no capacity and takes no instances:
        // changing it would promise what will not happen.
        if let Some(pool) = pool_get(&mut tx, &req.name).await.map_err(store_status)?
            && pool.deleting_since.is_some()
        {
            return Err(Status::failed_precondition(format!(
                "pool {} is being deleted; it can no longer be changed",
                req.name
            )));
        }
        let updated = pool_update(&mut tx, &req.name, &update, expected_version)
            .await
            .map_err(store_status)?;
        // After the update, so a stale `expected_version` refuses the
        // whole call, the pause included.
        let pool = match req.paused {
            None => updated.pool.clone(),
            Some(paused) => {
                let change = if paused {
                    pool_pause(
                        &mut tx,
                        &ctx,
                        &req.name,
                        &format!("paused by {}", ctx.actor),
                    )
                    .await
                    .map_err(store_status)?
                } else {
                    pool_resume(
                        &mut tx,
                        &ctx,
                        &req.name,
                        &format!("resumed by {}", ctx.actor),
                    )
                    .await
                    .map_err(store_status)?
                };
                if !change.woken.is_empty() {
                    // The waiting instances are due now; the command wakes
                    // the scheduler instead of its next tick.
                    let cmd = v1::ProvisionCommand {
                        instance_ids: change.woken.iter().map(|id| id.to_string()).collect(),
                        pool: req.name.clone(),
                    };
                    outbox_insert(&mut tx, &ctx, PROVISION, &cmd.encode_to_vec())
                        .await
                        .map_err(store_status)?;
                }
                if change.changed {
                    tracing::warn!(pool = %req.name, actor = %ctx.actor, paused, woken = change.woken.len(), "pool pause changed by an operator");
                }
                change.pool
            }
        };
        let (before, after) = (updated.previous_capacity, updated.pool.desired_capacity);
        // A new spend cap may let capacity grow (or stop it) at once.
        let cap_set = update.spend_cap_per_hour_micros.is_some() && after > 0;
        // A new warm size is refilled (or trimmed) at once.
        let warm_set = update.warm_size.is_some();
        if before != after || cap_set || warm_set {
            // Committed with the change, so the scheduler is woken even if
            // this process dies right after answering.
            let wake = v1::ReconcileCommand {
                pool: req.name.clone(),
                reason: if before != after {
                    format!("desired capacity {before} -> {after}")
                } else if warm_set {
                    "warm size changed".to_owned()
                } else {
                    "spend cap changed".to_owned()
                },
            };
            outbox_insert(&mut tx, &ctx, RECONCILE, &wake.encode_to_vec())
                .await
                .map_err(store_status)?;
        }
        let answer = self.answer_one(&mut tx, &pool).await?;
        tx.commit().await.map_err(|e| store_status(e.into()))?;
        tracing::info!(pool = %req.name, actor = %ctx.actor, version = pool.version, "pool updated");
        Ok(Response::new(answer))
    }

    async fn get_pool(
        &self,
        request: Request<v1::GetPoolRequest>,
    ) -> Result<Response<v1::Pool>, Status> {
        let name = &request.get_ref().name;
        validate::name("name", name)?;
        let mut conn = self.conn().await?;
        let row = pool_get(&mut conn, name)
            .await
            .map_err(store_status)?
            .ok_or_else(|| pool_not_found(name))?;
        let mut pool = self.answer_one(&mut conn, &row).await?;
        pool.recent_events = pool_events_recent(&mut conn, name, RECENT_POOL_EVENTS)
            .await
            .map_err(store_status)?
            .iter()
            .map(|e| e.to_proto())
            .collect();
        Ok(Response::new(pool))
    }

    async fn delete_pool(
        &self,
        request: Request<v1::DeletePoolRequest>,
    ) -> Result<Response<v1::DeletePoolResponse>, Status> {
        let ctx = write_ctx(&request)?;
        let answer = crate::lifecycle::delete_pool(&self.state, ctx, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn abandon_instance(
        &self,
        request: Request<v1::AbandonInstanceRequest>,
    ) -> Result<Response<v1::AbandonInstanceResponse>, Status> {
        let ctx = write_ctx(&request)?;
        let answer = crate::lifecycle::abandon(&self.state, ctx, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn list_pools(
        &self,
        _request: Request<v1::ListPoolsRequest>,
    ) -> Result<Response<v1::ListPoolsResponse>, Status> {
        let mut conn = self.conn().await?;
        let pools = pool_list(&mut conn).await.map_err(store_status)?;
        let live = spend_live_counts(&mut conn, None)
            .await
            .map_err(store_status)?;
        let disrupted = disruption_counts(&mut conn, None)
            .await
            .map_err(store_status)?;
        let prices = &self.state.limits.prices;
        let count = |m: &std::collections::HashMap<String, i64>, p: &PoolRow| {
            m.get(&p.name).copied().unwrap_or(0)
        };
        Ok(Response::new(v1::ListPoolsResponse {
            pools: pools
                .iter()
                .map(|p| pool_answer(p, prices, count(&live, p), count(&disrupted, p)))
                .collect(),
        }))
    }
}
