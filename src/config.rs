//! The sidecar's configuration: one TOML file, every key overridable by a `WALSYNC_...`
//! environment variable (for containers).
//!
//! Guarantees: unknown keys and missing fields are errors that name the key; a value that
//! parses is also checked against the cluster rules (ids in `1..=step`, names unique and
//! usable in slot names, star peers point at the hub) before anything connects. Passwords
//! never leave this module in clear text through `Debug` or `Display` ([`Dsn`]).
//!
//! Environment variables: `WALSYNC_<SECTION>_<KEY>` for `[cluster]`, `[node]` and
//! `[apply]` (`WALSYNC_NODE_DSN`), `WALSYNC_PEER_<NAME>_<KEY>` for the peer called NAME
//! (`WALSYNC_PEER_MAIN_DSN`); a peer named in the environment only is added.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dsn::DsnError;
pub use crate::dsn::{redact_password, redact_text, Dsn};
use crate::names::{NameError, NodeName};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The parser's message with any password in the echoed line masked.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("config: {0}")]
    Invalid(String),
    #[error("config: {0}")]
    Name(#[from] NameError),
}

impl From<DsnError> for ConfigError {
    fn from(e: DsnError) -> Self {
        ConfigError::Invalid(e.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// Every branch links to the hub only; the hub forwards every origin.
    Star,
    /// Every node links to every other; a link forwards only its upstream's own writes.
    Mesh,
}

/// Which of the two links with a peer this sidecar runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LinkRun {
    /// `peer -> self`: stream the peer's slot, apply here. The peer runs the other one.
    #[default]
    Pull,
    /// `self -> peer`: stream our slot, apply on the peer.
    Push,
    /// Both: for a node behind NAT that the peer cannot reach.
    Both,
    /// Neither: the peer runs both links with us.
    None,
}

impl LinkRun {
    pub fn pulls(self) -> bool {
        matches!(self, LinkRun::Pull | LinkRun::Both)
    }
    pub fn pushes(self) -> bool {
        matches!(self, LinkRun::Push | LinkRun::Both)
    }
    /// What the peer's config says of us so that every link with it runs exactly once:
    /// we run both, it runs none; we pull, it pulls the other direction.
    pub fn counterpart(self) -> LinkRun {
        match self {
            LinkRun::Both => LinkRun::None,
            LinkRun::None => LinkRun::Both,
            same => same,
        }
    }
    /// The word the config file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkRun::Pull => "pull",
            LinkRun::Push => "push",
            LinkRun::Both => "both",
            LinkRun::None => "none",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub node: NodeConfig,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub apply: ApplyConfig,
    /// Per-table conflict policies. Every node of the cluster must have the same ones.
    #[serde(default)]
    pub tables: Vec<TablePolicy>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub status: StatusConfig,
}

/// When `walsync status`, `/readyz` and the metrics call something a problem.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// A link down or retrying, or a slot without a reader, for longer than this is a
    /// problem (status exits 1). Shorter cuts are a store's normal life.
    #[serde(default = "default_alert_after_s")]
    pub alert_after_s: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            alert_after_s: default_alert_after_s(),
        }
    }
}

fn default_alert_after_s() -> u64 {
    60
}

/// Spooling for peers away a long time (docs/decisions/0006): the sidecar next to a slot
/// whose peer is away streams it into segments in this node's database and lets the
/// slot release its WAL; the returning link replays them first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Spool at all (every sidecar of the cluster must replay spools: all of this version).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Start spooling an inactive slot once it retains this much WAL...
    #[serde(default = "default_spool_after_bytes")]
    pub after_bytes: u64,
    /// ...or once it has been inactive this long.
    #[serde(default = "default_spool_after_s")]
    pub after_s: u64,
    /// A segment closes at the first commit past this size.
    #[serde(default = "default_spool_segment_bytes")]
    pub segment_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            enabled: true,
            after_bytes: default_spool_after_bytes(),
            after_s: default_spool_after_s(),
            segment_bytes: default_spool_segment_bytes(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_spool_after_bytes() -> u64 {
    1 << 30
}
fn default_spool_after_s() -> u64 {
    3600
}
fn default_spool_segment_bytes() -> u64 {
    8 << 20
}

/// The sidecar's HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to listen on, e.g. `0.0.0.0:9187`; none: no endpoint.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// How conflicts on one table are decided, beyond last-writer-wins.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TablePolicy {
    /// `schema.table`, or `table` for schema public.
    pub name: String,
    /// Columns whose changes add up (stock quantities): an update moves each by
    /// (new - old) on every node, so concurrent changes are all kept.
    #[serde(default)]
    pub counters: Vec<String>,
    /// A node whose version wins any conflict it is part of ("main wins"); between two
    /// other nodes, last-writer-wins still decides.
    #[serde(default)]
    pub prefer: Option<String>,
    /// `row` (default): a conflicting update wins or loses as a whole. `columns`: an
    /// update writes only the columns it changed, so concurrent edits of different
    /// columns of one row both survive (needs REPLICA IDENTITY FULL, which init sets).
    #[serde(default)]
    pub merge: MergeMode,
    /// The table is node-local (Odoo's bus, presence): its changes are neither applied
    /// nor forwarded by any node; each node's rows stay its own.
    #[serde(default)]
    pub local: bool,
    /// Node-local columns (`ir_cron.nextcall`): a peer's update never overwrites them
    /// here and does not count them when telling conflicts from sequential edits; an
    /// insert still carries them.
    #[serde(default)]
    pub local_columns: Vec<String>,
    /// Unique indexes (by name) whose collisions park the incoming row instead of
    /// settling it (renaming or merging).
    #[serde(default)]
    pub park_unique: Vec<String>,
    /// Unique indexes (by name) whose collisions merge the two rows although the key has
    /// a text column: keys that name one entity, where a renamed value would be junk
    /// (`mail_followers (res_model, res_id, partner_id)`). Keys without a text column
    /// merge anyway (decision 0008).
    #[serde(default)]
    pub merge_unique: Vec<String>,
    /// Columns the losing row of a rename also gets, as text (`{ sequence_number = "0" }`
    /// on Odoo's `account_move`: the renamed entry must not tie with the one that kept
    /// its name when Odoo looks for the journal's last number).
    #[serde(default)]
    pub on_rename: BTreeMap<String, String>,
}

/// How much of a row one conflict decision covers.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MergeMode {
    #[default]
    Row,
    Columns,
}

impl TablePolicy {
    /// `(schema, table)` this policy is for.
    pub fn qualified(&self) -> (String, String) {
        match self.name.split_once('.') {
            Some((s, t)) => (s.to_string(), t.to_string()),
            None => ("public".to_string(), self.name.clone()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub topology: Topology,
    #[serde(default)]
    pub hub: Option<String>,
    #[serde(default = "default_step")]
    pub step: u32,
    /// Nodes whose captured DDL is run here; DDL from any other node is recorded and
    /// shown, not run (a branch cannot push schema changes to main). None: every node.
    #[serde(default)]
    pub ddl_from: Option<Vec<String>>,
    /// The role every replayed DDL statement runs as, instead of the role that ran it on
    /// its author (which may not exist here, or be a superuser here). None: the captured
    /// role.
    #[serde(default)]
    pub ddl_role: Option<String>,
    /// How long the keys of deleted rows are kept (`walsync.tombstones`): an update
    /// from a node cut off longer than this, for a row deleted here, is recorded as
    /// `update_missing` instead of being decided by time against the delete.
    #[serde(default = "default_tombstone_days")]
    pub tombstone_days: u32,
}

fn default_step() -> u32 {
    16
}

fn default_tombstone_days() -> u32 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub id: u32,
    pub dsn: Dsn,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    pub id: u32,
    pub dsn: Dsn,
    #[serde(default)]
    pub links: LinkRun,
    /// The tables this peer's rows may change on this node (`merge::scope` patterns);
    /// None: every replicated table. Enforced on the links into this node that this
    /// sidecar runs.
    #[serde(default)]
    pub writes: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// First wait before reconnecting a failed link; doubles up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Target sessions each link applies on: independent source transactions run on
    /// several at once, committed in source order (decision 0011). 1: one at a time.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            sessions: default_sessions(),
        }
    }
}

/// Most target sessions a link may apply on.
pub const MAX_APPLY_SESSIONS: usize = 16;

fn default_sessions() -> usize {
    1
}

fn default_reconnect_min_ms() -> u64 {
    200
}
fn default_reconnect_max_ms() -> u64 {
    10_000
}

/// One node of the cluster as this sidecar knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub name: NodeName,
    pub id: u32,
    pub dsn: Dsn,
}

/// A directed flow of changes `from -> to`, run by this sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub from: NodeRef,
    pub to: NodeRef,
    /// Whether `from` forwards transactions authored by third nodes (the hub of a star).
    pub from_forwards_others: bool,
    /// `[cluster] ddl_from`: the nodes whose DDL is run on `to`.
    pub ddl_from: Option<Vec<String>>,
    /// `[cluster] ddl_role`: the role replayed DDL runs as on `to` (None: the captured one).
    pub ddl_role: Option<String>,
    /// `[[peers]] writes` of `to`'s config: what each author may change on `to` (empty
    /// on a link into a peer: the peer's own config sets what may be written there).
    pub writes: crate::merge::scope::WriteScopes,
}

impl LinkSpec {
    pub fn name(&self) -> String {
        format!("{}->{}", self.from.name, self.to.name)
    }
}

impl Config {
    /// Reads `path`, applies `WALSYNC_*` overrides from `env`, and checks the result.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path, env)
    }

    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let parse_err = |source: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: redact_text(&source.to_string()),
        };
        let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
        let overridden = apply_env(&mut table, env)?;
        let config: Config = if overridden {
            // Re-rendering keeps toml's messages (which name the key) for overridden values.
            let rendered = toml::to_string(&table).expect("a toml table always renders");
            toml::from_str(&rendered).map_err(parse_err)?
        } else {
            toml::from_str(text).map_err(parse_err)?
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let step = self.cluster.step;
        if !(2..=1024).contains(&step) {
            return Err(ConfigError::Invalid(format!(
                "cluster.step = {step}: must be between 2 and 1024 (it is fixed when the cluster is created; 16 is the default)"
            )));
        }
        if self.cluster.tombstone_days == 0 {
            return Err(ConfigError::Invalid(
                "cluster.tombstone_days = 0: must be at least 1, and longer than the longest cut a store may have (30 is the default)"
                    .to_string(),
            ));
        }
        for name in self.cluster.ddl_from.iter().flatten() {
            NodeName::parse(name)
                .map_err(|e| ConfigError::Invalid(format!("cluster.ddl_from: {e}")))?;
        }
        let mut seen_names = BTreeMap::new();
        let mut seen_ids = BTreeMap::new();
        let all = std::iter::once(("node", &self.node.name, self.node.id, &self.node.dsn))
            .chain(self.peers.iter().map(|p| ("peers", &p.name, p.id, &p.dsn)));
        for (section, name, id, dsn) in all {
            NodeName::parse(name)?;
            dsn.parse()?;
            if id == 0 || id > step {
                return Err(ConfigError::Invalid(format!(
                    "{section}: node {name:?} has id {id}; ids go from 1 to cluster.step ({step})"
                )));
            }
            if let Some(other) = seen_names.insert(name.clone(), id) {
                return Err(ConfigError::Invalid(format!(
                    "node name {name:?} appears twice (ids {other} and {id})"
                )));
            }
            if let Some(other) = seen_ids.insert(id, name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "nodes {other:?} and {name:?} both have id {id}; ids are unique in the cluster"
                )));
            }
        }
        for p in &self.peers {
            let Some(writes) = &p.writes else { continue };
            crate::merge::scope::WriteScope::parse(writes)
                .map_err(|e| ConfigError::Invalid(format!("peer {:?}: writes: {e}", p.name)))?;
            if !p.links.pulls() {
                return Err(ConfigError::Invalid(format!(
                    "peer {:?}: writes is enforced by the sidecar that applies {0:?}'s rows on this node, \
                     but with links = \"{}\" {0:?}'s own sidecar applies them; set links = \"pull\" or \"both\" here \
                     (and the counterpart on {0:?}), or limit the tables {0:?}'s role may write here with GRANTs",
                    p.name,
                    p.links.as_str()
                )));
            }
        }
        match (self.cluster.topology, &self.cluster.hub) {
            (Topology::Mesh, Some(hub)) => {
                return Err(ConfigError::Invalid(format!(
                    "cluster.hub = {hub:?} is for topology = \"star\"; remove it for a mesh"
                )))
            }
            (Topology::Star, None) => {
                return Err(ConfigError::Invalid(
                    "cluster.hub is missing: a star needs the name of its hub node (e.g. hub = \"main\")"
                        .into(),
                ))
            }
            (Topology::Star, Some(hub)) => {
                if *hub != self.node.name {
                    if !self.peers.iter().any(|p| &p.name == hub) {
                        return Err(ConfigError::Invalid(format!(
                            "cluster.hub = {hub:?} is neither this node nor one of its peers"
                        )));
                    }
                    if let Some(p) = self.peers.iter().find(|p| &p.name != hub) {
                        return Err(ConfigError::Invalid(format!(
                            "peer {:?}: in a star a branch links to the hub {hub:?} only",
                            p.name
                        )));
                    }
                }
            }
            (Topology::Mesh, None) => {}
        }
        let mut seen_tables = std::collections::BTreeSet::new();
        for t in &self.tables {
            if !seen_tables.insert(t.qualified()) {
                return Err(ConfigError::Invalid(format!(
                    "[[tables]] {:?} appears twice",
                    t.name
                )));
            }
            let decides = !t.counters.is_empty()
                || t.prefer.is_some()
                || t.merge == MergeMode::Columns
                || !t.local_columns.is_empty()
                || !t.park_unique.is_empty()
                || !t.merge_unique.is_empty()
                || !t.on_rename.is_empty();
            if !decides && !t.local {
                return Err(ConfigError::Invalid(format!(
                    "[[tables]] {:?} sets no policy (counters = [\"column\", ...], prefer = \"node\", merge = \"columns\", local = true, local_columns = [\"column\", ...], park_unique = [\"index\", ...] or merge_unique = [\"index\", ...] or on_rename = {{ column = \"value\" }})",
                    t.name
                )));
            }
            if let Some(both) = t.park_unique.iter().find(|i| t.merge_unique.contains(i)) {
                return Err(ConfigError::Invalid(format!(
                    "[[tables]] {:?}: index {both:?} is in both park_unique and merge_unique; keep it in one",
                    t.name
                )));
            }
            if decides && t.local {
                return Err(ConfigError::Invalid(format!(
                    "[[tables]] {:?}: local = true keeps the table on each node, so its other keys would never apply; remove them",
                    t.name
                )));
            }
            if let Some(p) = &t.prefer {
                NodeName::parse(p).map_err(|e| {
                    ConfigError::Invalid(format!("[[tables]] {:?}: prefer: {e}", t.name))
                })?;
            }
        }
        if self.apply.reconnect_min_ms == 0
            || self.apply.reconnect_min_ms > self.apply.reconnect_max_ms
        {
            return Err(ConfigError::Invalid(
                "apply.reconnect_min_ms must be at least 1 and at most apply.reconnect_max_ms"
                    .into(),
            ));
        }
        if self.apply.sessions == 0 || self.apply.sessions > MAX_APPLY_SESSIONS {
            return Err(ConfigError::Invalid(format!(
                "apply.sessions is {}: it must be between 1 (one transaction at a time) and {MAX_APPLY_SESSIONS}",
                self.apply.sessions
            )));
        }
        Ok(())
    }

    pub fn this_node(&self) -> NodeRef {
        NodeRef {
            name: NodeName::parse(&self.node.name).expect("validated in Config::validate"),
            id: self.node.id,
            dsn: self.node.dsn.clone(),
        }
    }

    pub fn peer_nodes(&self) -> Vec<(NodeRef, LinkRun)> {
        self.peers
            .iter()
            .map(|p| {
                let node = NodeRef {
                    name: NodeName::parse(&p.name).expect("validated in Config::validate"),
                    id: p.id,
                    dsn: p.dsn.clone(),
                };
                (node, p.links)
            })
            .collect()
    }

    /// The nodes whose captured DDL runs on this node: `[cluster] ddl_from` if set; in
    /// a star, else, the hub alone (a store's schema change, whoever made it there, is
    /// recorded on main for a person to accept, never run by itself on main and on every
    /// other store); in a mesh, else, every node (`None`).
    pub fn ddl_from(&self) -> Option<Vec<String>> {
        match (
            &self.cluster.ddl_from,
            self.cluster.topology,
            &self.cluster.hub,
        ) {
            (Some(nodes), _, _) => Some(nodes.clone()),
            (None, Topology::Star, Some(hub)) => Some(vec![hub.clone()]),
            (None, _, _) => None,
        }
    }

    /// What each peer may write on this node (`[[peers]] writes`), by its origin name.
    pub fn write_scopes(&self) -> crate::merge::scope::WriteScopes {
        let by_origin = self
            .peers
            .iter()
            .filter_map(|p| {
                let scope = crate::merge::scope::WriteScope::parse(p.writes.as_ref()?)
                    .expect("validated in Config::validate");
                let name = NodeName::parse(&p.name).expect("validated in Config::validate");
                Some((crate::names::PgName::origin_of(&name), scope))
            })
            .collect();
        crate::merge::scope::WriteScopes::new(by_origin)
    }

    fn is_hub(&self, name: &str) -> bool {
        self.cluster.topology == Topology::Star && self.cluster.hub.as_deref() == Some(name)
    }

    /// The links this sidecar runs, in config order.
    pub fn links(&self) -> Vec<LinkSpec> {
        let me = self.this_node();
        let mut links = Vec::new();
        for (peer, run) in self.peer_nodes() {
            if run.pulls() {
                links.push(LinkSpec {
                    from_forwards_others: self.is_hub(peer.name.as_str()),
                    from: peer.clone(),
                    to: me.clone(),
                    ddl_from: self.ddl_from(),
                    ddl_role: self.cluster.ddl_role.clone(),
                    writes: self.write_scopes(),
                });
            }
            if run.pushes() {
                links.push(LinkSpec {
                    from_forwards_others: self.is_hub(me.name.as_str()),
                    from: me.clone(),
                    to: peer,
                    ddl_from: self.ddl_from(),
                    ddl_role: self.cluster.ddl_role.clone(),
                    writes: Default::default(),
                });
            }
        }
        links
    }
}

/// Known keys per section, for naming a mistyped environment variable.
const SECTION_KEYS: &[(&str, &[&str])] = &[
    ("cluster", &["topology", "hub", "step"]),
    ("node", &["name", "id", "dsn"]),
    (
        "apply",
        &["reconnect_min_ms", "reconnect_max_ms", "sessions"],
    ),
    ("metrics", &["listen"]),
    ("status", &["alert_after_s"]),
    (
        "spool",
        &["enabled", "after_bytes", "after_s", "segment_bytes"],
    ),
];
const PEER_KEYS: &[&str] = &["name", "id", "dsn", "links"];

/// `WALSYNC_<PREFIX>...` variables read by tests and tools, not by the config.
const NOT_CONFIG_PREFIXES: &[&str] = &["chaos_", "test_", "fuzz_", "localpg_", "bench_"];

/// Applies `WALSYNC_*` variables to the parsed table. Returns whether anything changed.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<bool, ConfigError> {
    let given: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("WALSYNC_"))
        .collect();
    // `WALSYNC_<X>_FILE=/path`: the value of WALSYNC_<X> read from that file (container
    // secrets, a DSN with its password kept out of the environment). Both is an error.
    let mut vars: Vec<(String, String)> = Vec::with_capacity(given.len());
    for (var, raw) in &given {
        let lower = var.to_ascii_lowercase();
        let Some(base) = var.strip_suffix("_FILE").filter(|_| {
            !NOT_CONFIG_PREFIXES
                .iter()
                .any(|p| lower["walsync_".len()..].starts_with(p))
        }) else {
            vars.push((var.clone(), raw.clone()));
            continue;
        };
        if given.iter().any(|(k, _)| k == base) {
            return Err(ConfigError::Env {
                var: var.clone(),
                reason: format!("{base} is set too: set one of them"),
            });
        }
        let text = std::fs::read_to_string(raw).map_err(|e| ConfigError::Env {
            var: var.clone(),
            reason: format!("cannot read {raw}: {e}"),
        })?;
        vars.push((
            base.to_string(),
            text.trim_end_matches(['\n', '\r']).to_string(),
        ));
    }
    vars.sort();
    let mut changed = false;
    for (var, raw) in vars {
        let rest = &var["WALSYNC_".len()..];
        let lower = rest.to_ascii_lowercase();
        // Variables that are not config keys but belong to the binary itself.
        if matches!(
            lower.as_str(),
            "config" | "log" | "log_format" | "start_timeout"
        ) || NOT_CONFIG_PREFIXES.iter().any(|p| lower.starts_with(p))
        {
            continue;
        }
        let env_err = |reason: String| ConfigError::Env {
            var: var.clone(),
            reason,
        };
        if let Some(peer_rest) = lower.strip_prefix("peer_") {
            let (name, key) = PEER_KEYS
                .iter()
                .filter_map(|k| {
                    peer_rest
                        .strip_suffix(k)
                        .and_then(|n| n.strip_suffix('_'))
                        .map(|n| (n, *k))
                })
                .next()
                .ok_or_else(|| {
                    env_err(format!(
                        "expected WALSYNC_PEER_<NAME>_<KEY> with KEY one of {}",
                        PEER_KEYS.join(", ").to_uppercase()
                    ))
                })?;
            let peers = table
                .entry("peers")
                .or_insert_with(|| toml::Value::Array(Vec::new()))
                .as_array_mut()
                .ok_or_else(|| {
                    env_err("`peers` in the file is not an array of tables ([[peers]])".into())
                })?;
            let pos = peers
                .iter()
                .position(|p| p.get("name").and_then(|n| n.as_str()) == Some(name));
            let peer = match pos {
                Some(i) => &mut peers[i],
                None => {
                    let mut t = toml::Table::new();
                    t.insert("name".into(), toml::Value::String(name.to_string()));
                    peers.push(toml::Value::Table(t));
                    peers.last_mut().expect("just pushed")
                }
            };
            let t = peer
                .as_table_mut()
                .ok_or_else(|| env_err("peer entry is not a table".into()))?;
            t.insert(key.to_string(), env_value(key, &raw));
            changed = true;
            continue;
        }
        let (section, key) = SECTION_KEYS
            .iter()
            .find_map(|(s, keys)| {
                let k = lower.strip_prefix(s)?.strip_prefix('_')?;
                keys.contains(&k).then_some((*s, k))
            })
            .ok_or_else(|| {
                env_err(
                    "not a walsync setting; known: WALSYNC_CLUSTER_{TOPOLOGY,HUB,STEP}, WALSYNC_NODE_{NAME,ID,DSN}, WALSYNC_APPLY_{RECONNECT_MIN_MS,RECONNECT_MAX_MS}, WALSYNC_METRICS_LISTEN, WALSYNC_SPOOL_{ENABLED,AFTER_BYTES,AFTER_S,SEGMENT_BYTES}, WALSYNC_PEER_<NAME>_{ID,DSN,LINKS}".into(),
                )
            })?;
        let sect = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| env_err(format!("`{section}` in the file is not a table")))?;
        sect.insert(key.to_string(), env_value(key, &raw));
        changed = true;
    }
    Ok(changed)
}

/// Environment values are strings; numeric keys become integers so that types match the file.
fn env_value(key: &str, raw: &str) -> toml::Value {
    let numeric = matches!(
        key,
        "id" | "step"
            | "reconnect_min_ms"
            | "reconnect_max_ms"
            | "sessions"
            | "after_bytes"
            | "after_s"
            | "segment_bytes"
    );
    match (raw.parse::<i64>(), raw) {
        (Ok(n), _) if numeric => toml::Value::Integer(n),
        (_, "true") if key == "enabled" => toml::Value::Boolean(true),
        (_, "false") if key == "enabled" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests;
