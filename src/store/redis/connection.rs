//! How a [`RedisStore`](super::RedisStore) reaches Redis: one server or a cluster, in plain
//! text or over TLS, with its credentials kept out of every `Debug` output, error and log line.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo, ProtocolVersion,
    RedisError, RedisResult, ScriptInvocation,
};
use tokio::sync::Notify;

use crate::error::ConfigError;

/// Where the store's Redis is, and how to reach it, as the builder collects it.
#[derive(Clone)]
pub(super) struct Settings {
    pub(super) nodes: Nodes,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    #[cfg(feature = "redis-tls")]
    pub(super) ca_certificate: Option<Vec<u8>>,
    #[cfg(feature = "redis-tls")]
    pub(super) client_certificate: Option<(Vec<u8>, Vec<u8>)>,
}

/// One server's URL, or a cluster's initial nodes.
#[derive(Clone)]
pub(super) enum Nodes {
    Server(String),
    Cluster(Vec<String>),
}

impl Settings {
    pub(super) fn new(nodes: Nodes) -> Self {
        Self {
            nodes,
            username: None,
            password: None,
            #[cfg(feature = "redis-tls")]
            ca_certificate: None,
            #[cfg(feature = "redis-tls")]
            client_certificate: None,
        }
    }

    fn urls(&self) -> &[String] {
        match &self.nodes {
            Nodes::Server(url) => std::slice::from_ref(url),
            Nodes::Cluster(urls) => urls,
        }
    }

    /// Every node's connection settings, with the builder's credentials in place of the URL's.
    fn infos(&self) -> Result<Vec<ConnectionInfo>, ConfigError> {
        if self.urls().is_empty() {
            return invalid("url", "a cluster needs at least one node");
        }
        if self
            .urls()
            .iter()
            .any(|url| is_tls(url) != is_tls(&self.urls()[0]))
        {
            return invalid(
                "url",
                "a cluster's nodes are all rediss:// (TLS) or all redis://",
            );
        }
        self.urls()
            .iter()
            .map(|url| {
                if is_tls(url) && !cfg!(feature = "redis-tls") {
                    return invalid("url", "a rediss:// URL needs the `redis-tls` feature");
                }
                let Ok(info) = url.as_str().into_connection_info() else {
                    return invalid("url", "not a Redis URL");
                };
                let mut redis = info.redis_settings().clone();
                // An empty one is none (a variable left unset).
                if let Some(username) = self.username.as_ref().filter(|u| !u.is_empty()) {
                    redis = redis.set_username(username);
                }
                if let Some(password) = self.password.as_ref().filter(|p| !p.is_empty()) {
                    redis = redis.set_password(password);
                }
                Ok(info.set_redis_settings(redis))
            })
            .collect()
    }

    /// The passwords this store sends, to be scrubbed from any text it shows.
    pub(super) fn secrets(&self) -> Secrets {
        let mut secrets: Vec<String> = self.password.iter().cloned().collect();
        for url in self.urls() {
            if let Ok(info) = url.as_str().into_connection_info() {
                secrets.extend(info.redis_settings().password().map(str::to_owned));
            }
        }
        secrets.retain(|secret| !secret.is_empty());
        secrets.sort();
        secrets.dedup();
        Secrets(secrets.into())
    }

    /// The connection for commands and the one for release notifications, which hands every
    /// push it receives to `push` (RESP3, resubscribed after a reconnect). Neither connects
    /// until it is first used, so Redis need not be up yet.
    pub(super) fn connect(
        &self,
        timeout: Duration,
        poll: Duration,
        push: impl AsyncPushSender,
    ) -> Result<(Connection, Connection), ConfigError> {
        let infos = self.infos()?;
        #[cfg(feature = "redis-tls")]
        if infos
            .iter()
            .any(|info| matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }))
        {
            default_crypto_provider();
        }
        let unusable = |_| ConfigError::InvalidSetting {
            name: "url",
            reason: "Redis rejected the connection settings",
        };
        match &self.nodes {
            Nodes::Server(_) => {
                let info = infos.into_iter().next().expect("one node");
                let commands = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(poll);
                let resp3 = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let subscriptions = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_max_delay(poll)
                    .set_push_sender(push)
                    .set_automatic_resubscription();
                let connection = ConnectionManager::new_lazy_with_config(
                    self.client(info.clone()).map_err(unusable)?,
                    commands,
                )
                .map_err(unusable)?;
                let subscriber = ConnectionManager::new_lazy_with_config(
                    self.client(info.set_redis_settings(resp3))
                        .map_err(unusable)?,
                    subscriptions,
                )
                .map_err(unusable)?;
                Ok((
                    Connection::Server(connection),
                    Connection::Server(subscriber),
                ))
            }
            Nodes::Cluster(_) => {
                let cluster = |infos: Vec<ConnectionInfo>| {
                    // Connections are made off the requests' paths, so a node far away (or
                    // hung) is given longer than one operation.
                    let builder = ClusterClientBuilder::new(infos)
                        .connection_timeout(timeout.max(CLUSTER_CONNECT))
                        .response_timeout(timeout)
                        .retries(3)
                        .min_retry_wait(10)
                        .max_retry_wait(u64::try_from(poll.as_millis()).unwrap_or(u64::MAX));
                    self.cluster_certificates(builder)
                };
                let resp3 = infos
                    .iter()
                    .map(|info| {
                        let redis = info
                            .redis_settings()
                            .clone()
                            .set_protocol(ProtocolVersion::RESP3);
                        info.clone().set_redis_settings(redis)
                    })
                    .collect();
                let commands = cluster(infos).build().map_err(unusable)?;
                let subscriptions = cluster(resp3)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(push)
                    .build()
                    .map_err(unusable)?;
                Ok((
                    Connection::Cluster(Arc::new(LazyCluster::new(commands))),
                    Connection::Cluster(Arc::new(LazyCluster::new(subscriptions))),
                ))
            }
        }
    }

    /// A client of one server, with the builder's certificates if any.
    fn client(&self, info: ConnectionInfo) -> RedisResult<Client> {
        #[cfg(feature = "redis-tls")]
        if let Some(certificates) = self.certificates() {
            return Client::build_with_tls(info, certificates);
        }
        Client::open(info)
    }

    #[cfg(feature = "redis-tls")]
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        if self.ca_certificate.is_none() && self.client_certificate.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self
                .client_certificate
                .clone()
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: self.ca_certificate.clone(),
        })
    }

    fn cluster_certificates(&self, builder: ClusterClientBuilder) -> ClusterClientBuilder {
        #[cfg(feature = "redis-tls")]
        if let Some(certificates) = self.certificates() {
            return builder.certs(certificates);
        }
        builder
    }
}

/// Makes ring's the process's rustls provider if it has none, so that a TLS connection never
/// panics for want of one (as it would where the process's crates enable two providers).
#[cfg(feature = "redis-tls")]
fn default_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one meanwhile: either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn is_tls(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
    })
}

fn invalid<T>(name: &'static str, reason: &'static str) -> Result<T, ConfigError> {
    Err(ConfigError::InvalidSetting { name, reason })
}

impl fmt::Debug for Settings {
    /// The nodes' schemes and addresses, and whether credentials are set: never the
    /// credentials themselves.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.urls().iter().map(|url| shown(url)).collect();
        let mut debug = f.debug_struct("Settings");
        match &self.nodes {
            Nodes::Server(_) => debug.field("server", &nodes[0]),
            Nodes::Cluster(_) => debug.field("cluster", &nodes),
        };
        debug
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"));
        #[cfg(feature = "redis-tls")]
        debug
            .field("ca_certificate", &self.ca_certificate.is_some())
            .field("client_certificate", &self.client_certificate.is_some());
        debug.finish()
    }
}

/// A URL as it may be shown: its scheme and address (and database), without its credentials.
fn shown(url: &str) -> String {
    let Ok(info) = url.into_connection_info() else {
        return "<not a Redis URL>".to_owned();
    };
    let scheme = match info.addr() {
        redis::ConnectionAddr::Tcp(..) => "redis",
        redis::ConnectionAddr::TcpTls { .. } => "rediss",
        _ => "redis+unix",
    };
    let credentials = match info.redis_settings().password() {
        Some(_) => "<credentials>@",
        None => "",
    };
    format!(
        "{scheme}://{credentials}{}/{}",
        info.addr(),
        info.redis_settings().db()
    )
}

/// The passwords a store sends: any text it shows (an error, a log line) has them replaced.
#[derive(Clone, Default)]
pub(super) struct Secrets(Arc<[String]>);

impl Secrets {
    pub(super) fn scrub(&self, text: String) -> String {
        self.0.iter().fold(text, |text, secret| {
            if text.contains(secret.as_str()) {
                text.replace(secret.as_str(), "<redacted>")
            } else {
                text
            }
        })
    }
}

/// A connection to one server (reconnecting by itself), or to a cluster (made at its first
/// use, then following the cluster's slots through `MOVED`, `ASK` and failovers by itself).
#[derive(Clone)]
pub(super) enum Connection {
    Server(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// The least time a cluster's node is given to accept a connection.
const CLUSTER_CONNECT: Duration = Duration::from_secs(1);

/// A cluster's connection, made at its first use in a task of its own: an operation waits
/// for it within its timeout, but its timeout never cuts the making short, so a cluster
/// that takes longer than one operation to reach (a node hung, far away) is reached all the
/// same.
pub(super) struct LazyCluster {
    client: Arc<redis::cluster::ClusterClient>,
    made: Arc<Making>,
}

#[derive(Default)]
struct Making {
    connection: OnceLock<ClusterConnection>,
    /// Whether an attempt runs, and why the last one failed.
    attempt: Mutex<(bool, Option<String>)>,
    ended: Notify,
}

impl LazyCluster {
    fn new(client: redis::cluster::ClusterClient) -> Self {
        Self {
            client: Arc::new(client),
            made: Arc::default(),
        }
    }

    /// The cluster's connection; if it is not made yet, an attempt is started (unless one
    /// runs) and awaited. A failed attempt is made again at the next use.
    async fn get(&self) -> RedisResult<ClusterConnection> {
        if let Some(connection) = self.made.connection.get() {
            return Ok(connection.clone());
        }
        let ended = self.made.ended.notified();
        let mut ended = std::pin::pin!(ended);
        ended.as_mut().enable();
        {
            let mut attempt = self.made.attempt.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(connection) = self.made.connection.get() {
                return Ok(connection.clone());
            }
            if !attempt.0 {
                attempt.0 = true;
                let (client, made) = (self.client.clone(), self.made.clone());
                tokio::spawn(async move {
                    let outcome = client.get_async_connection().await;
                    let mut attempt = made.attempt.lock().unwrap_or_else(|e| e.into_inner());
                    match outcome {
                        Ok(connection) => {
                            let _ = made.connection.set(connection);
                        }
                        Err(error) => attempt.1 = Some(error.to_string()),
                    }
                    attempt.0 = false;
                    drop(attempt);
                    made.ended.notify_waiters();
                });
            }
        }
        ended.await;
        if let Some(connection) = self.made.connection.get() {
            return Ok(connection.clone());
        }
        let attempt = self.made.attempt.lock().unwrap_or_else(|e| e.into_inner());
        let why = attempt.1.clone().unwrap_or_default();
        Err(RedisError::from((
            ErrorKind::Io,
            "the cluster could not be reached",
            why,
        )))
    }
}

impl Connection {
    /// Runs a script (its keys in one hash slot: a cluster sends it to that slot's node).
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            Self::Server(connection) => invocation.invoke_async(&mut connection.clone()).await,
            Self::Cluster(cluster) => invocation.invoke_async(&mut cluster.get().await?).await,
        }
    }

    /// Subscribes to `channel` (a subscriber connection).
    pub(super) async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Server(connection) => connection.clone().subscribe(channel).await,
            Self::Cluster(cluster) => cluster.get().await?.subscribe(channel).await,
        }
    }

    pub(super) async fn ping(&self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            Self::Server(connection) => ping.query_async(&mut connection.clone()).await,
            Self::Cluster(cluster) => ping.query_async(&mut cluster.get().await?).await,
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Server(_) => "Connection::Server",
            Self::Cluster(_) => "Connection::Cluster",
        })
    }
}
