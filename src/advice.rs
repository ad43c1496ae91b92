//! Setups that will collide during a cut, seen before they do: `walsync init` and
//! `walsync status` print these with the fix. Nothing here needs a person now (status
//! does not exit 1 for them); they say what a cut will do.
//!
//! Generic: which unique indexes settle their collisions by renaming the loser's value
//! and which park the incoming row (docs/conflicts.md). Odoo's, when its tables are
//! there: PoS configs sharing a journal, `no_gap` sequences, attachments in the
//! filestore, scheduled actions running on a branch (docs/odoo.md).

use serde_json::{json, Value as Json};
use tokio_postgres::Client;

use crate::config::{Config, Topology};
use crate::merge::keys::{settlement, Settlement, UniquePolicy};

/// Setup warnings and the unique-key settlement of the node `client` is connected to.
pub async fn gather(client: &Client, config: &Config) -> Result<Json, tokio_postgres::Error> {
    let mut warnings = Vec::new();
    let odoo: bool = client
        .query_one(
            "SELECT to_regclass('public.ir_module_module') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if odoo {
        odoo_warnings(client, config, &mut warnings).await?;
    }
    unlogged_tables(client, &mut warnings).await?;
    let unique_keys = unique_key_settlement(client, config).await?;
    Ok(json!({ "warnings": warnings, "unique_keys": unique_keys }))
}

/// Unlogged tables write no WAL, so logical decoding never sees their rows: they stay
/// on the node that writes them (as in native logical replication). Said once, by name.
async fn unlogged_tables(
    client: &Client,
    warnings: &mut Vec<String>,
) -> Result<(), tokio_postgres::Error> {
    let names: Vec<String> = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' \
               AND n.nspname NOT IN ('walsync', 'pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !names.is_empty() {
        warnings.push(format!(
            "unlogged table(s) {}: their rows write no WAL, so they are not replicated and stay on this node \
             (their schema changes are); ALTER TABLE ... SET LOGGED to replicate one",
            names.join(", ")
        ));
    }
    Ok(())
}

/// Whether the table exists (an Odoo without that module has not got it).
async fn has(client: &Client, table: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0))
}

async fn odoo_warnings(
    client: &Client,
    config: &Config,
    warnings: &mut Vec<String>,
) -> Result<(), tokio_postgres::Error> {
    if has(client, "public.pos_config").await? {
        for r in client
            .query(
                "SELECT j.code::text, string_agg(c.name::text, ', ' ORDER BY c.id) \
                 FROM pos_config c JOIN account_journal j ON j.id = c.journal_id \
                 WHERE c.active GROUP BY j.code HAVING count(*) > 1",
                &[],
            )
            .await?
        {
            let (journal, configs): (String, String) = (r.get(0), r.get(1));
            warnings.push(format!(
                "PoS configs {configs} share the sale journal {journal}: stores that post in it while cut off \
                 post entries with the same name, which walsync renames (docs/odoo.md). Fix: give each store's \
                 PoS config its own sale journal (Point of Sale > Configuration > Settings > Accounting)"
            ));
        }
        if has(client, "public.pos_config_pos_payment_method_rel").await? {
            for r in client
                .query(
                    "SELECT j.code::text, string_agg(DISTINCT c.name::text, ', ') \
                     FROM pos_config_pos_payment_method_rel rel \
                     JOIN pos_config c ON c.id = rel.pos_config_id AND c.active \
                     JOIN pos_payment_method m ON m.id = rel.pos_payment_method_id \
                     JOIN account_journal j ON j.id = m.journal_id \
                     WHERE j.type IN ('cash', 'bank') GROUP BY j.code HAVING count(DISTINCT c.id) > 1",
                    &[],
                )
                .await?
            {
                let (journal, configs): (String, String) = (r.get(0), r.get(1));
                warnings.push(format!(
                    "PoS configs {configs} take payments into the same {journal} journal: cash and bank \
                     statements of two stores cut off at once collide. Fix: one cash (and bank) payment method \
                     with its own journal per store"
                ));
            }
        }
    }
    let renamed_entries_keep_their_number = config.tables.iter().any(|t| {
        t.qualified() == ("public".to_string(), "account_move".to_string())
            && t.on_rename.contains_key("sequence_number")
    });
    if has(client, "public.account_move").await? && !renamed_entries_keep_their_number {
        warnings.push(
            "account_move has no on_rename policy: a journal entry renamed after a collision keeps its \
             sequence_number, ties with the entry that kept the name, and Odoo may then number the journal's \
             next entries from the renamed one or propose a name in use. Fix: [[tables]] name = \"account_move\" \
             with on_rename = { sequence_number = \"0\" } on every node (docs/odoo.md)"
                .to_string(),
        );
    }
    if has(client, "public.ir_sequence").await? {
        let no_gap: i64 = client
            .query_one(
                "SELECT count(*) FROM ir_sequence WHERE implementation = 'no_gap' AND active",
                &[],
            )
            .await?
            .get(0);
        if no_gap > 0 {
            warnings.push(format!(
                "{no_gap} no_gap sequence(s) (ir_sequence.implementation): each numbers from one shared row, \
                 so two nodes using one while cut off hand out the same numbers. Fix: give each branch its own \
                 (SELECT name, code FROM ir_sequence WHERE implementation = 'no_gap')"
            ));
        }
    }
    if has(client, "public.ir_config_parameter").await? {
        let location: Option<String> = client
            .query_opt(
                "SELECT value FROM ir_config_parameter WHERE key = 'ir_attachment.location'",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        if location.as_deref().unwrap_or("file") == "file" {
            warnings.push(
                "attachments are stored in each node's filestore (ir_attachment.location is 'file'): their \
                 rows replicate, their files do not. Fix: store them in the database, or sync the filestores \
                 (docs/odoo.md, \"Attachments\")"
                    .to_string(),
            );
        }
    }
    let branch = config.cluster.topology == Topology::Star
        && config.cluster.hub.as_deref() != Some(config.node.name.as_str());
    if branch && has(client, "public.ir_cron").await? {
        let ran: i64 = client
            .query_one(
                "SELECT count(*) FROM ir_cron WHERE active AND lastcall > (now() AT TIME ZONE 'UTC') - interval '1 day'",
                &[],
            )
            .await?
            .get(0);
        if ran > 0 {
            warnings.push(format!(
                "{ran} scheduled action(s) ran on this branch in the last day (ir_cron.lastcall): actions that \
                 send mail or create records then run on several nodes over the same rows. Fix: start this \
                 branch's Odoo with --max-cron-threads=0 (docs/odoo.md)"
            ));
        }
    }
    Ok(())
}

/// Every unique index other than a primary key on the replicated tables, by how its
/// collisions are settled ([`settlement`], the rule the applier uses): `renamed` (a text
/// column in its key), `merged` (none, or the table's `merge_unique`) or `parked` (the
/// table's `park_unique`, or no primary key to merge by).
async fn unique_key_settlement(
    client: &Client,
    config: &Config,
) -> Result<Json, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, t.relname::text, c.relname::text, \
               EXISTS (SELECT 1 FROM pg_attribute a \
                       WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]) \
                         AND format_type(a.atttypid, NULL) IN ('text', 'character varying', 'citext')) \
               OR (i.indexprs IS NOT NULL AND EXISTS ( \
                       SELECT 1 FROM pg_depend d JOIN pg_attribute a \
                         ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                       WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid \
                         AND format_type(a.atttypid, NULL) IN ('text', 'character varying', 'citext'))), \
               EXISTS (SELECT 1 FROM pg_index p WHERE p.indrelid = i.indrelid AND p.indisprimary) \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE i.indisunique AND NOT i.indisprimary AND t.relkind IN ('r', 'p') \
               AND n.nspname NOT IN ('walsync', 'pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1, 2, 3",
            &[],
        )
        .await?;
    let (mut renamed, mut merged, mut parked) = (Vec::new(), Vec::new(), Vec::new());
    for r in &rows {
        let (schema, table, index, text, has_key): (String, String, String, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let policy = config
            .tables
            .iter()
            .find(|t| t.qualified() == (schema.clone(), table.clone()));
        let policy = UniquePolicy {
            park: policy.map_or(&[], |t| &t.park_unique),
            merge: policy.map_or(&[], |t| &t.merge_unique),
        };
        let name = format!("{schema}.{table}: {index}");
        match settlement(&index, text.then_some((0, None)), has_key, policy) {
            Settlement::Rename { .. } => renamed.push(name),
            Settlement::Merge => merged.push(name),
            Settlement::Park { .. } => parked.push(name),
        }
    }
    Ok(json!({ "renamed": renamed, "merged": merged, "parked": parked }))
}
