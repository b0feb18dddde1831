//! Lease locks in the shared store: one replica at a time places the ACME order for a certificate
//! (certmagic's pattern, `replicas.md`). A lease is a key holding a random token with an expiry; its
//! holder refreshes it while working and deletes it when done, and only the holder can do either (both
//! compare the token in one script). A holder that dies stops refreshing, and the lease lapses within
//! its time to live, so another replica takes over.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use tokio::sync::watch;

use super::{SharedStore, StoreError};

/// Extends the lease only while `ARGV[1]` still holds it.
const REFRESH: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Sets the lease to lapse in `ARGV[2]` milliseconds only while `ARGV[1]` still holds it (same as
/// REFRESH; named for what the caller means).
const KEEP_FOR: &str = REFRESH;

/// Deletes the lease only while `ARGV[1]` still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

impl SharedStore {
    /// Takes the lease `name` for `ttl` if no one holds it: `None` when another replica does.
    pub async fn try_lease(
        self: &Arc<Self>,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut token = [0u8; 16];
        aws_lc_rs::rand::fill(&mut token).map_err(|_| StoreError::Random)?;
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let mut command = redis::cmd("SET");
        command
            .arg(self.key(name))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let mut connection = self.connection.clone();
        let taken = self
            .deadline(command.query_async::<Option<String>>(&mut connection))
            .await?;
        Ok(taken.map(|_| Lease {
            store: self.clone(),
            name: name.to_string(),
            token,
            ttl,
        }))
    }

    async fn lease_script(&self, script: &str, lease: &Lease) -> Result<bool, StoreError> {
        self.lease_script_for(script, lease, lease.ttl).await
    }

    async fn lease_script_for(
        &self,
        script: &str,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let script = Script::new(script);
        let mut invocation = script.key(self.key(&lease.name));
        invocation.arg(&lease.token).arg(millis(ttl));
        let mut connection = self.connection.clone();
        let done = self
            .deadline(invocation.invoke_async::<i64>(&mut connection))
            .await?;
        Ok(done == 1)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A lease this replica holds.
pub struct Lease {
    store: Arc<SharedStore>,
    name: String,
    token: String,
    ttl: Duration,
}

impl Lease {
    /// Keeps the lease refreshed (every third of its time to live) until the returned guard is dropped,
    /// which releases it. The guard's `lost` turns true when the lease could not be kept: the work it
    /// guards should stop, since another replica may take over.
    pub fn hold(self) -> HeldLease {
        let (lost_tx, lost) = watch::channel(false);
        let lease = Arc::new(self);
        let keeper = lease.clone();
        let refresher = tokio::spawn(async move {
            let mut last_refresh = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(keeper.ttl / 3).await;
                match keeper.store.lease_script(REFRESH, &keeper).await {
                    Ok(true) => last_refresh = tokio::time::Instant::now(),
                    Ok(false) => {
                        tracing::warn!(lease = %keeper.name, "lost the lease (it lapsed and another replica may hold it)");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    // Unreachable for now: the lease is still ours until it would have lapsed.
                    Err(e) if last_refresh.elapsed() < keeper.ttl => {
                        tracing::debug!(lease = %keeper.name, error = %e, "cannot refresh the lease yet");
                    }
                    Err(e) => {
                        tracing::warn!(lease = %keeper.name, error = %e, "the lease lapsed while redis was unreachable");
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            }
        });
        HeldLease {
            lease,
            refresher,
            lost,
            kept: false,
        }
    }
}

pub struct HeldLease {
    lease: Arc<Lease>,
    refresher: tokio::task::JoinHandle<()>,
    pub lost: watch::Receiver<bool>,
    /// Set by `keep_for`: the lease then lapses by itself instead of being released.
    kept: bool,
}

impl HeldLease {
    /// Stops refreshing and leaves the lease to lapse after `hold` (no one else takes it meanwhile):
    /// after a failed order, so the next attempt, whoever makes it, waits out the backoff.
    pub async fn keep_for(mut self, hold: Duration) {
        self.refresher.abort();
        self.kept = true;
        if let Err(e) = self
            .lease
            .store
            .lease_script_for(KEEP_FOR, &self.lease, hold)
            .await
        {
            tracing::debug!(lease = %self.lease.name, error = %e, "lease not extended; it lapses by itself");
        }
    }

    /// Resolves once the lease is lost (never, while it is kept).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
        if !*self.lost.borrow() {
            // The refresher ended without losing it (cannot happen while held): never resolve.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.refresher.abort();
        if self.kept {
            return;
        }
        let lease = self.lease.clone();
        // Released in the background: a holder that cannot reach Redis lets the lease lapse instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = lease.store.lease_script(RELEASE, &lease).await {
                    tracing::debug!(lease = %lease.name, error = %e, "lease not released; it lapses by itself");
                }
            });
        }
    }
}
