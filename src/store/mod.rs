//! Shared state for replicas in Redis (`[storage] backend = "redis"`): the `[[rate_limit]]` budgets, one
//! atomic script and one round trip per rate-limited request, so a client's budget holds across every
//! replica; values (the local CA, the ACME account and certificate bundles, challenge answers), sealed
//! when `encryption_key_env` is set (`sealed`); lease locks (`lease`); and announcements over pub/sub.
//! Redis is never waited on for long: each call has a deadline, and after a failure the store is skipped
//! for a second (callers count locally meanwhile) and tried again, so an outage costs nothing but the
//! sharing. The connection is made lazily and remade by redis-rs's `ConnectionManager`, so the store
//! comes back by itself.

pub mod lease;
pub mod sealed;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};

use crate::config::RedisStorage;
use crate::metrics::Metrics;

/// Longest a request waits for Redis before counting locally.
const CALL_DEADLINE: Duration = Duration::from_millis(250);
/// After a failure, how long Redis is skipped before it is tried again.
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Outage warnings at most this often (the metrics count every failure).
const WARN_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage.url: {0}")]
    Url(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is being skipped after a failure")]
    Skipped,
    #[error("no randomness for a lease token")]
    Random,
    #[error(transparent)]
    Sealed(#[from] sealed::SealError),
}

/// A token bucket per key, refilled continuously: `capacity` tokens per `period` milliseconds. Returns 0
/// when a token was taken, else the milliseconds until one will be there. The clock is Redis's own, so
/// replicas with skewed clocks agree.
const TAKE_TOKEN: &str = r"
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
  at = now
end
local elapsed = math.max(0, now - at)
tokens = math.min(capacity, tokens + elapsed * capacity / period)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * period / capacity)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], period)
return wait
";

/// What `portcullis check --connect` found at the store.
#[derive(Debug)]
pub struct StoreReport {
    pub version: String,
    /// Keys under the prefix, counted up to `PROBE_KEY_LIMIT`.
    pub keys: usize,
    /// ACME certificates stored (their key names, without the prefix).
    pub certificates: Vec<String>,
    pub accounts: usize,
    /// Whether the secrets open with the configured encryption key, when one is stored.
    pub secrets: Option<String>,
}

const PROBE_KEY_LIMIT: usize = 100_000;
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// Reaches the store once, as `check --connect` does: the server's version (the scripts need Redis 4
/// or later, or Valkey) and how many keys carry the prefix.
pub async fn probe(config: &RedisStorage) -> Result<StoreReport, StoreError> {
    let client = redis::Client::open(connection_info(config)?)?;
    let work = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut connection)
            .await?;
        let version = info
            .lines()
            .find_map(|l| {
                l.strip_prefix("valkey_version:")
                    .map(|v| format!("valkey {v}"))
            })
            .or_else(|| {
                info.lines().find_map(|l| {
                    l.strip_prefix("redis_version:")
                        .map(|v| format!("redis {v}"))
                })
            })
            .unwrap_or_else(|| "an unknown server".into());
        let mut keys = 0;
        let (mut certificates, mut accounts) = (Vec::new(), 0);
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", config.key_prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            keys += batch.len();
            for key in batch {
                let name = key.strip_prefix(&config.key_prefix).unwrap_or(&key);
                if name.starts_with("acme:") && name.contains(":cert:") {
                    certificates.push(name.to_string());
                } else if name.starts_with("acme:") && name.ends_with(":account") {
                    accounts += 1;
                }
            }
            cursor = next;
            if cursor == 0 || keys >= PROBE_KEY_LIMIT {
                break;
            }
        }
        certificates.sort();
        // One secret tells whether this replica's key is the one the others sealed with.
        let secrets = match certificates.first() {
            Some(name) => {
                let stored: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("{}{name}", config.key_prefix))
                    .query_async(&mut connection)
                    .await?;
                let key = config
                    .encryption_key
                    .as_ref()
                    .map(|k| sealed::SealingKey::new(k))
                    .transpose()?;
                let sealed = stored.as_ref().is_some_and(|v| sealed::is_sealed(v));
                Some(
                    match (stored.map(|v| sealed::open(key.as_ref(), name, v)), sealed) {
                        (Some(Ok(_)), true) => "sealed, and they open with this key".to_string(),
                        (Some(Ok(_)), false) if key.is_some() => {
                            "in the clear (sealed from the next write with this key)".to_string()
                        }
                        (Some(Ok(_)), false) => {
                            "in the clear (no storage.encryption_key_env)".to_string()
                        }
                        (Some(Err(e)), _) => format!("error: {e}"),
                        (None, _) => "gone while looking".to_string(),
                    },
                )
            }
            None => None,
        };
        Ok::<_, StoreError>(StoreReport {
            version: version.trim().to_string(),
            keys,
            certificates,
            accounts,
            secrets,
        })
    };
    tokio::time::timeout(PROBE_DEADLINE, work)
        .await
        .map_err(|_| StoreError::Timeout(PROBE_DEADLINE))?
}

/// The URL with the password from the config (the URL as stored has it replaced).
fn connection_info(config: &RedisStorage) -> Result<redis::ConnectionInfo, StoreError> {
    let info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| StoreError::Url(e.to_string()))?;
    Ok(match &config.password {
        Some(password) => {
            let settings = info.redis_settings().clone().set_password(password);
            info.set_redis_settings(settings)
        }
        None => info,
    })
}

pub struct SharedStore {
    /// For pub/sub, which needs a connection of its own.
    client: redis::Client,
    connection: ConnectionManager,
    sealing: Option<sealed::SealingKey>,
    key_prefix: String,
    take_token: Script,
    metrics: Arc<Metrics>,
    health: Mutex<Health>,
    /// For the logs: the URL without its password.
    shown_url: String,
}

#[derive(Default)]
struct Health {
    skip_until: Option<Instant>,
    last_warning: Option<Instant>,
    down: bool,
}

impl SharedStore {
    /// Prepares the connection without making it (no I/O: serving must not wait on Redis). Must run
    /// inside the Tokio runtime.
    pub fn open(
        config: &RedisStorage,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<SharedStore>, StoreError> {
        let client = redis::Client::open(connection_info(config)?)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_DEADLINE))
            .set_response_timeout(Some(CALL_DEADLINE))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        let sealing = config
            .encryption_key
            .as_ref()
            .map(|key| sealed::SealingKey::new(key))
            .transpose()?;
        metrics.set_store_up(true);
        Ok(Arc::new(SharedStore {
            client,
            connection,
            sealing,
            key_prefix: config.key_prefix.clone(),
            take_token: Script::new(TAKE_TOKEN),
            metrics,
            health: Mutex::new(Health::default()),
            shown_url: config.url.clone(),
        }))
    }

    /// Takes a token from the shared bucket `name`: `Ok(Ok(()))` taken, `Ok(Err(wait))` spent, `Err`
    /// when Redis could not say (the caller counts locally).
    pub async fn take_token(
        &self,
        name: &str,
        capacity: u32,
        period: Duration,
    ) -> Result<Result<(), Duration>, StoreError> {
        if self.skipping() {
            return Err(StoreError::Skipped);
        }
        let key = self.key(name);
        let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut connection = self.connection.clone();
        let mut invocation = self.take_token.key(key);
        invocation.arg(capacity).arg(period_ms);
        let wait_ms = self
            .deadline(invocation.invoke_async::<u64>(&mut connection))
            .await?;
        Ok(if wait_ms == 0 {
            Ok(())
        } else {
            Err(Duration::from_millis(wait_ms))
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.key_prefix)
    }

    /// The value at `name`, if any.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut command = redis::cmd("GET");
        command.arg(self.key(name));
        let mut connection = self.connection.clone();
        self.deadline(command.query_async::<Option<Vec<u8>>>(&mut connection))
            .await
    }

    /// A secret at `name` (a key, an account): opened when sealed.
    pub async fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get(name).await? {
            Some(stored) => Ok(Some(sealed::open(self.sealing.as_ref(), name, stored)?)),
            None => Ok(None),
        }
    }

    /// Stores `value` at `name`, replacing what was there (one `SET`: readers see the old value or the
    /// new one, never a part), for `ttl` when given.
    pub async fn set(
        &self,
        name: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mut command = redis::cmd("SET");
        command.arg(self.key(name)).arg(value);
        if let Some(ttl) = ttl {
            command
                .arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        let mut connection = self.connection.clone();
        self.deadline(command.query_async::<()>(&mut connection))
            .await
    }

    /// A secret, sealed first when an encryption key is configured.
    pub async fn set_secret(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let value = self.seal(name, value)?;
        self.set(name, &value, None).await
    }

    fn seal(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        Ok(match &self.sealing {
            Some(key) => key.seal(name, value)?,
            None => value.to_vec(),
        })
    }

    /// Stores a secret at `name` unless something is there already; whether it was stored.
    pub async fn set_secret_if_absent(&self, name: &str, value: &[u8]) -> Result<bool, StoreError> {
        let value = self.seal(name, value)?;
        let mut command = redis::cmd("SET");
        command.arg(self.key(name)).arg(value).arg("NX");
        let mut connection = self.connection.clone();
        let stored = self
            .deadline(command.query_async::<Option<String>>(&mut connection))
            .await?;
        Ok(stored.is_some())
    }

    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let mut command = redis::cmd("DEL");
        command.arg(self.key(name));
        let mut connection = self.connection.clone();
        self.deadline(command.query_async::<()>(&mut connection))
            .await
    }

    /// Announces `message` on `channel` to every replica following it.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<(), StoreError> {
        let mut command = redis::cmd("PUBLISH");
        command.arg(self.key(channel)).arg(message);
        let mut connection = self.connection.clone();
        self.deadline(command.query_async::<i64>(&mut connection))
            .await
            .map(|_| ())
    }

    /// Wakes `notify` for every message on `channel`, and once after each (re)subscription (messages
    /// sent while this replica was cut off are lost; the waker then looks for itself). Runs until the
    /// runtime stops; reconnects with backoff.
    pub fn follow(self: &Arc<Self>, channel: &str, notify: Arc<tokio::sync::Notify>) {
        let store = self.clone();
        let channel = self.key(channel);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                match store.client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            backoff = Duration::from_millis(500);
                            notify.notify_one();
                            let mut messages = pubsub.on_message();
                            while futures_util::StreamExt::next(&mut messages).await.is_some() {
                                notify.notify_one();
                            }
                            tracing::debug!(%channel, "redis subscription ended; subscribing again");
                        }
                        Err(e) => tracing::debug!(%channel, error = %e, "cannot subscribe"),
                    },
                    Err(e) => tracing::debug!(%channel, error = %e, "cannot connect to subscribe"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
    }

    /// One call under `CALL_DEADLINE`, with the store's health kept.
    async fn deadline<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(CALL_DEADLINE, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(CALL_DEADLINE)),
        };
        match &result {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        result
    }

    /// Whether a call now would be skipped (a failure within the last second).
    pub fn skipping(&self) -> bool {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health
            .skip_until
            .is_some_and(|until| Instant::now() < until)
    }

    fn succeeded(&self) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if health.down {
            health.down = false;
            health.skip_until = None;
            self.metrics.set_store_up(true);
            tracing::warn!(url = %self.shown_url, "redis is reachable again; login budgets and certificates are shared again");
        }
    }

    fn failed(&self, error: &StoreError) {
        self.metrics.store_failed();
        let now = Instant::now();
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.skip_until = Some(now + SKIP_AFTER_FAILURE);
        if !health.down {
            health.down = true;
            self.metrics.set_store_up(false);
        }
        if health
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= WARN_EVERY)
        {
            health.last_warning = Some(now);
            tracing::warn!(url = %self.shown_url, %error, "redis is unreachable; until it is back each replica counts login budgets on its own and certificates are not shared (serving goes on)");
        }
    }
}
