use super::*;

const BRANCH: &str = r#"
[cluster]
topology = "star"
hub = "main"
step = 16

[node]
name = "branch1"
id = 2
dsn = "postgres://walsync:s3cret@127.0.0.1:5433/odoo"

[[peers]]
name = "main"
id = 1
dsn = "postgres://walsync:s3cret@main.example:5432/odoo"
links = "both"
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::from_toml(text, Path::new("walsync.toml"), env)
}

#[test]
fn branch_behind_nat_runs_both_links_with_main() {
    let c = load(BRANCH, &[]).unwrap();
    let names: Vec<_> = c.links().iter().map(|l| l.name()).collect();
    assert_eq!(names, ["main->branch1", "branch1->main"]);
    let links = c.links();
    assert!(
        links[0].from_forwards_others,
        "the hub forwards other branches' writes"
    );
    assert!(!links[1].from_forwards_others);
}

#[test]
fn a_star_runs_the_hubs_ddl_only_unless_told_more_and_a_mesh_every_nodes() {
    let star = load(BRANCH, &[]).unwrap();
    assert_eq!(star.ddl_from(), Some(vec!["main".to_string()]));
    assert!(star
        .links()
        .iter()
        .all(|l| l.ddl_from == Some(vec!["main".to_string()])));
    let told = load(
        &BRANCH.replacen(
            "step = 16",
            "step = 16\nddl_from = [\"main\", \"branch1\"]",
            1,
        ),
        &[],
    )
    .unwrap();
    assert_eq!(told.ddl_from().map(|d| d.len()), Some(2));
    let mesh = load(
        &BRANCH
            .replacen(
                "topology = \"star\"\nhub = \"main\"",
                "topology = \"mesh\"",
                1,
            )
            .replacen("links = \"both\"", "", 1),
        &[],
    )
    .unwrap();
    assert_eq!(mesh.ddl_from(), None);
}

#[test]
fn unknown_key_is_an_error_that_names_it() {
    let text = BRANCH.replace("step = 16", "step = 16\ntpology = \"mesh\"");
    let err = load(&text, &[]).unwrap_err().to_string();
    assert!(err.contains("tpology"), "{err}");
}

#[test]
fn missing_field_is_an_error_that_names_it() {
    let text = BRANCH.replace("id = 2\n", "");
    let err = load(&text, &[]).unwrap_err().to_string();
    assert!(err.contains("missing field `id`"), "{err}");
}

#[test]
fn environment_overrides_file_and_adds_peers() {
    let c = load(
        BRANCH,
        &[
            ("WALSYNC_NODE_DSN", "postgres://walsync:other@10.0.0.2/odoo"),
            ("WALSYNC_PEER_MAIN_LINKS", "pull"),
            ("WALSYNC_CLUSTER_STEP", "32"),
        ],
    )
    .unwrap();
    assert_eq!(
        c.node.dsn.expose(),
        "postgres://walsync:other@10.0.0.2/odoo"
    );
    assert_eq!(c.cluster.step, 32);
    assert_eq!(c.peers[0].links, LinkRun::Pull);
}

#[test]
fn spool_settings_default_and_come_from_the_file_or_the_environment() {
    let c = load(BRANCH, &[]).unwrap();
    assert!(c.spool.enabled);
    assert_eq!(c.spool.after_bytes, 1 << 30);
    let text = format!("{BRANCH}\n[spool]\nafter_s = 60\nsegment_bytes = 1024\n");
    let c = load(
        &text,
        &[
            ("WALSYNC_SPOOL_ENABLED", "false"),
            ("WALSYNC_SPOOL_AFTER_BYTES", "4096"),
        ],
    )
    .unwrap();
    assert!(!c.spool.enabled);
    assert_eq!(
        (c.spool.after_bytes, c.spool.after_s, c.spool.segment_bytes),
        (4096, 60, 1024)
    );
    let err = load(&format!("{BRANCH}\n[spool]\nafter = 1\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("after"), "{err}");
}

#[test]
fn unknown_environment_variable_is_named() {
    let err = load(BRANCH, &[("WALSYNC_NODE_DNS", "x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("WALSYNC_NODE_DNS"), "{err}");
}

#[test]
fn passwords_are_masked_in_display_and_debug() {
    let c = load(BRANCH, &[]).unwrap();
    let shown = format!("{} {:?} {:?}", c.node.dsn, c.node.dsn, c);
    assert!(!shown.contains("s3cret"), "{shown}");
    assert_eq!(
        redact_password("host=h user=u password='a b' dbname=d"),
        "host=h user=u password=*** dbname=d"
    );
    assert_eq!(
        redact_password("postgres://u@h/d?password=x&sslmode=off"),
        "postgres://u@h/d?password=***&sslmode=off"
    );
    assert_eq!(
        redact_password("host=h password = secret dbname=d"),
        "host=h password=*** dbname=d"
    );
    // A TOML error echoes the line it stopped at: no password in it.
    let broken = BRANCH.replacen("dsn = \"", "dsn = \"host=h password = hunter2 ", 1) + "\n[node\n";
    let err = load(&broken, &[]).unwrap_err().to_string();
    assert!(!err.contains("hunter2") && !err.contains("s3cret"), "{err}");
    let err = Config::from_toml(
        "[node]\ndsn = \"postgres://u:hunter2@h/d\" x\n",
        std::path::Path::new("c.toml"),
        Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn a_dsn_for_pg_dump_carries_no_password() {
    let dsn = Dsn::new("host=h user=u password='a b' dbname=d");
    let (text, password) = dsn.for_libpq().unwrap();
    assert_eq!(text, "host=h user=u dbname=d");
    assert_eq!(password.as_deref(), Some("a b"));
    let dsn = Dsn::new("postgres://u:pw@h:5432/d?sslmode=disable");
    let (text, password) = dsn.for_libpq().unwrap();
    assert_eq!(text, "postgres://u@h:5432/d?sslmode=disable");
    assert_eq!(password.as_deref(), Some("pw"));
}

#[test]
fn ids_must_be_unique_and_within_step() {
    let dup = BRANCH.replace("id = 2", "id = 1");
    assert!(load(&dup, &[])
        .unwrap_err()
        .to_string()
        .contains("both have id 1"));
    let big = BRANCH.replace("id = 2", "id = 17");
    assert!(load(&big, &[])
        .unwrap_err()
        .to_string()
        .contains("ids go from 1 to cluster.step"));
}

#[test]
fn star_branch_may_only_peer_with_the_hub() {
    let text =
        format!("{BRANCH}\n[[peers]]\nname = \"branch2\"\nid = 3\ndsn = \"postgres://x@h/d\"\n");
    let err = load(&text, &[]).unwrap_err().to_string();
    assert!(err.contains("links to the hub"), "{err}");
}

#[test]
fn mesh_has_no_hub_and_pulls_by_default() {
    let text = r#"
[cluster]
topology = "mesh"
[node]
name = "a"
id = 1
dsn = "host=127.0.0.1"
[[peers]]
name = "b"
id = 2
dsn = "host=127.0.0.1"
"#;
    let c = load(text, &[]).unwrap();
    let links = c.links();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].name(), "b->a");
    assert!(!links[0].from_forwards_others);
    assert!(load(&text.replace("mesh\"", "mesh\"\nhub = \"a\""), &[]).is_err());
}

#[test]
fn counter_columns_are_declared_per_table() {
    let text =
        format!("{BRANCH}\n[[tables]]\nname = \"product\"\ncounters = [\"qty_available\"]\n");
    let c = load(&text, &[]).unwrap();
    assert_eq!(
        c.tables[0].qualified(),
        ("public".to_string(), "product".to_string())
    );
    assert_eq!(c.tables[0].counters, ["qty_available"]);
    let err = load(
        &format!("{text}\n[[tables]]\nname = \"public.product\"\ncounters = [\"x\"]\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("appears twice"), "{err}");
    let err = load(&text.replace("counters", "countres"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("countres"), "{err}");
}

#[test]
fn a_dsn_that_does_not_parse_is_refused_when_the_config_loads() {
    let err = load(
        &BRANCH.replace(
            "postgres://walsync:s3cret@127.0.0.1:5433/odoo",
            "host=h port=notaport",
        ),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("does not parse") && err.contains("port=notaport"),
        "{err}"
    );
}

#[test]
fn a_table_can_prefer_a_node_or_merge_by_column_and_must_set_something() {
    let text = format!(
        "{BRANCH}\n[[tables]]\nname = \"product\"\nprefer = \"main\"\n\
         [[tables]]\nname = \"partner\"\nmerge = \"columns\"\n"
    );
    let c = load(&text, &[]).unwrap();
    assert_eq!(c.tables[0].prefer.as_deref(), Some("main"));
    assert_eq!(c.tables[1].merge, crate::config::MergeMode::Columns);
    let err = load(&format!("{BRANCH}\n[[tables]]\nname = \"x\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sets no policy"), "{err}");
    let err = load(&text.replace("\"columns\"", "\"cells\""), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cells"), "{err}");
    let err = load(
        &text.replace("prefer = \"main\"", "prefer = \"Main Store\""),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("prefer"), "{err}");
}

#[test]
fn a_local_table_sets_nothing_else() {
    let ok = format!("{BRANCH}\n[[tables]]\nname = \"bus_bus\"\nlocal = true\n");
    assert!(load(&ok, &[]).unwrap().tables[0].local);
    let cols =
        format!("{BRANCH}\n[[tables]]\nname = \"ir_cron\"\nlocal_columns = [\"nextcall\"]\n");
    assert_eq!(
        load(&cols, &[]).unwrap().tables[0].local_columns,
        ["nextcall"]
    );
    let err = load(&format!("{ok}prefer = \"main\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("local = true"), "{err}");
}

#[test]
fn a_setting_can_come_from_a_file_named_by_a_file_variable() {
    let dir = std::env::temp_dir().join(format!("walsync-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("dsn");
    std::fs::write(
        &secret,
        "host=db user=walsync password=from-a-secret dbname=odoo\n",
    )
    .unwrap();
    let file_var = ("WALSYNC_NODE_DSN_FILE", secret.to_str().unwrap());
    let c = load(BRANCH, &[file_var]).unwrap();
    assert_eq!(
        c.node.dsn.expose(),
        "host=db user=walsync password=from-a-secret dbname=odoo"
    );
    let both = load(BRANCH, &[file_var, ("WALSYNC_NODE_DSN", "host=x")])
        .unwrap_err()
        .to_string();
    assert!(both.contains("set one of them"), "{both}");
    let missing = load(BRANCH, &[("WALSYNC_NODE_DSN_FILE", "/nonexistent/walsync")])
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("cannot read /nonexistent/walsync"),
        "{missing}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_peers_write_scope_applies_on_the_links_into_this_node_only() {
    let scoped = BRANCH.replacen(
        "links = \"both\"",
        "links = \"both\"\nwrites = [\"pos_*\", \"stock.move\"]",
        1,
    );
    let c = load(&scoped, &[]).unwrap();
    let links = c.links();
    assert_eq!(links[0].name(), "main->branch1");
    assert!(!links[0]
        .writes
        .allows("walsync_main", "public", "res_users"));
    assert!(links[0]
        .writes
        .allows("walsync_main", "public", "pos_order"));
    assert!(links[0].writes.allows("walsync_main", "stock", "move"));
    assert!(links[0]
        .writes
        .allows("walsync_branch2", "public", "res_users"));
    assert!(
        links[1].writes.is_empty(),
        "main's own config says what may be written on main"
    );

    let err = load(&scoped.replace("links = \"both\"", "links = \"none\""), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("peer \"main\": writes is enforced by the sidecar that applies")
            && err.contains("links = \"pull\""),
        "{err}"
    );
    let err = load(&scoped.replace("stock.move", "a.b.c"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("peer \"main\": writes: \"a.b.c\" is not a table pattern"),
        "{err}"
    );
}
