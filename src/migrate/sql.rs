//! SQL text for live migration: the row filter (built-in bit operators only: publication row
//! filters forbid user functions), the fence table, the fence itself and its triggers (row and
//! statement level), progress records, publications, subscriptions, the catch-up probes.
//! Pure string building over validated identifiers; no I/O.

use std::collections::BTreeMap;

use h3o::CellIndex;

/// SQLSTATE raised by the fence trigger when a write targets a cell that migrated away.
pub const FENCE_SQLSTATE: &str = "CGF01";

/// The parent at resolution `r` of a BIGINT H3 cell column `col` (resolution >= r), with
/// built-in operators only (design §5): clear the resolution field, set it to r, set the
/// digits below r to 7 (all ones).
pub fn parent_expr(col: &str, r: u8) -> String {
    let unused_bits = 3 * (15 - u32::from(r));
    format!("(({col} & ~(15::bigint << 52)) | ({r}::bigint << 52) | ((1::bigint << {unused_bits}) - 1))")
}

/// The same parent arithmetic with the resolution given by a SQL expression (`f.res` of a fence
/// row) instead of a constant; the caller makes sure `col` is at that resolution or finer.
fn parent_expr_at(col: &str, res: &str) -> String {
    format!("(({col} & ~(15::bigint << 52)) | (({res})::bigint << 52) | ((1::bigint << (3 * (15 - ({res})))) - 1))")
}

/// `(<parent at r1> = ANY(ARRAY[..]::bigint[]) OR <parent at r2> = ANY(..))` for the moving cells.
pub fn cell_filter(col: &str, cells: &[CellIndex]) -> String {
    let mut by_res: BTreeMap<u8, Vec<i64>> = BTreeMap::new();
    for c in cells {
        by_res.entry(u8::from(c.resolution())).or_default().push(u64::from(*c) as i64);
    }
    let parts: Vec<String> = by_res
        .iter()
        .map(|(r, v)| {
            let list: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            format!("{} = ANY (ARRAY[{}]::bigint[])", parent_expr(col, *r), list.join(", "))
        })
        .collect();
    format!("({})", parts.join(" OR "))
}

/// Schema objects cellgate keeps on every shard database it migrates: progress, fenced cells.
pub const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS cellgate;
CREATE TABLE IF NOT EXISTS cellgate.fenced_cells (
    cell bigint PRIMARY KEY,
    res int NOT NULL CHECK (res BETWEEN 0 AND 15),
    migration text NOT NULL,
    fenced_at timestamptz NOT NULL DEFAULT now()
);
-- The map version that moved the cells away: writes routed by an older map are refused by the
-- statement trigger. NULL (fences written before this column existed) refuses every routed write.
ALTER TABLE cellgate.fenced_cells ADD COLUMN IF NOT EXISTS map_version bigint;
CREATE TABLE IF NOT EXISTS cellgate.migrations (
    id text PRIMARY KEY,
    state text NOT NULL,
    doc jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);";

/// Per-table fence trigger: rejects INSERT/UPDATE/DELETE of rows whose cell (old or new) lies
/// under a fenced cell. Fires for local writes only (not for logical-replication apply, which
/// runs with session_replication_role = replica), so copying into a fenced target still works.
///
/// Next to it, a statement-level trigger (see [`fence_statement_function`]) that fires even when
/// the statement matches no row on this shard: the row trigger alone lets a stale UPDATE/DELETE
/// of rows that now live on the new owner succeed here with 0 rows, an acknowledged lost write.
pub fn fence_trigger(table: &str, col: &str) -> String {
    let check = |rec: &str| {
        format!(
            "EXISTS (SELECT 1 FROM cellgate.fenced_cells f WHERE f.cell = {})",
            parent_expr_at(&format!("{rec}.{col}"), "f.res")
        )
    };
    format!(
        "CREATE OR REPLACE FUNCTION cellgate.fence_{table}() RETURNS trigger LANGUAGE plpgsql
    -- Runs with the rights of its owner (the migration role): application roles need no access
    -- to the cellgate schema. A pinned search_path keeps SECURITY DEFINER safe.
    SECURITY DEFINER SET search_path = pg_catalog AS $fn$
BEGIN
    IF TG_OP <> 'INSERT' AND {old} THEN
        RAISE EXCEPTION 'cell of this row migrated to another shard (fenced)' USING ERRCODE = '{FENCE_SQLSTATE}';
    END IF;
    IF TG_OP <> 'DELETE' AND {new} THEN
        RAISE EXCEPTION 'cell of this row migrated to another shard (fenced)' USING ERRCODE = '{FENCE_SQLSTATE}';
    END IF;
    RETURN COALESCE(NEW, OLD);
END $fn$;
DROP TRIGGER IF EXISTS cellgate_fence ON public.{table};
CREATE TRIGGER cellgate_fence BEFORE INSERT OR UPDATE OR DELETE ON public.{table}
    FOR EACH ROW EXECUTE FUNCTION cellgate.fence_{table}();
{stmt_fn}
DROP TRIGGER IF EXISTS cellgate_fence_stmt ON public.{table};
CREATE TRIGGER cellgate_fence_stmt BEFORE INSERT OR UPDATE OR DELETE ON public.{table}
    FOR EACH STATEMENT EXECUTE FUNCTION cellgate.fence_statement();",
        stmt_fn = fence_statement_function(),
        old = check("OLD"),
        new = check("NEW"),
    )
}

/// The statement trigger's function, shared by every fenced table. cellgate's write path sets
/// `cellgate.route = '<routed cell as bigint>:<map version>'` (transaction-local) before the
/// first statement; a write routed into a fenced cell by a map older than the fence is refused
/// with the fence SQLSTATE, which makes the sender refresh its map and retry on the new owner.
/// Writes without the setting (not sent by cellgate) are left to the row trigger.
pub fn fence_statement_function() -> String {
    // Variable names differ from the table's columns (PL/pgSQL refuses ambiguous references).
    let parent = parent_expr_at("routed_cell", "f.res");
    format!(
        "CREATE OR REPLACE FUNCTION cellgate.fence_statement() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    route text := current_setting('cellgate.route', true);
    routed_cell bigint;
    routed_version bigint;
BEGIN
    IF route IS NULL OR route = '' THEN
        RETURN NULL;
    END IF;
    routed_cell := split_part(route, ':', 1)::bigint;
    routed_version := split_part(route, ':', 2)::bigint;
    IF EXISTS (SELECT 1 FROM cellgate.fenced_cells f
               WHERE f.res <= ((routed_cell >> 52) & 15)
                 AND f.cell = {parent}
                 AND (f.map_version IS NULL OR routed_version < f.map_version)) THEN
        RAISE EXCEPTION 'cell % migrated to another shard (fenced): map version % is stale', routed_cell, routed_version
            USING ERRCODE = '{FENCE_SQLSTATE}';
    END IF;
    RETURN NULL;
END $fn$;"
    )
}

/// The fence (cutover step 4b): the lock waits for in-flight writers and blocks new ones until
/// the fence commits; from then on both triggers refuse writes to the cells on this shard.
/// `map_version` is the version of the map that assigns the cells to their new owner.
pub fn fence(tables: &[(String, String)], cells: &[CellIndex], migration: &str, map_version: u64) -> String {
    let tables: Vec<String> = tables.iter().map(|(t, _)| format!("public.{t}")).collect();
    let values: Vec<String> = cells
        .iter()
        .map(|c| {
            format!(
                "({}, {}, {}, {})",
                u64::from(*c) as i64,
                u8::from(c.resolution()),
                literal(migration),
                map_version as i64
            )
        })
        .collect();
    format!(
        "BEGIN; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE;
         INSERT INTO cellgate.fenced_cells (cell, res, migration, map_version) VALUES {}
           ON CONFLICT (cell) DO UPDATE SET res = EXCLUDED.res, migration = EXCLUDED.migration,
             map_version = EXCLUDED.map_version, fenced_at = now();
         COMMIT;",
        tables.join(", "),
        values.join(", ")
    )
}

/// After the publish: the fence carries the version actually published ($1 = migration id,
/// $2 = version), in case the map moved on between the fence and the publish.
pub const FENCE_SET_VERSION: &str =
    "UPDATE cellgate.fenced_cells SET map_version = $2 WHERE migration = $1 AND map_version IS DISTINCT FROM $2";

/// A shard that becomes the owner again lifts the fence it kept from an earlier move away ($1 =
/// the cells as bigint[]).
pub const LIFT_FENCE_CELLS: &str = "DELETE FROM cellgate.fenced_cells WHERE cell = ANY($1)";

/// An aborted migration lifts its own fence on the source ($1 = migration id).
pub const LIFT_FENCE_OF_MIGRATION: &str = "DELETE FROM cellgate.fenced_cells WHERE migration = $1";

/// The source's WAL position right after the fence committed.
pub const CURRENT_LSN: &str = "SELECT pg_current_wal_lsn()::text";

/// Has the slot ($1) confirmed everything up to $2 (an LSN as text)? NULL when the slot is gone.
pub const SLOT_CONFIRMED_PAST: &str =
    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1";

/// Bytes of WAL the slot ($1) is behind; NULL when it has not confirmed anything yet.
pub const SLOT_LAG: &str =
    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1";

/// Tables of the subscription ($1) not yet in state `r`eady.
pub const SUBSCRIPTION_NOT_READY: &str = "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = $1 AND r.srsubstate <> 'r'";

pub const SUBSCRIPTION_EXISTS: &str = "SELECT count(*) FROM pg_subscription WHERE subname = $1";
pub const PUBLICATION_EXISTS: &str = "SELECT count(*) FROM pg_publication WHERE pubname = $1";
pub const DROP_SLOT: &str = "SELECT pg_drop_replication_slot($1) FROM pg_replication_slots WHERE slot_name = $1";

/// Does the target have table $1 with column $2?
pub const TARGET_HAS_COLUMN: &str = "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2";

/// Upsert one migration's progress record ($1 id, $2 state, $3 doc).
pub const PERSIST: &str = "INSERT INTO cellgate.migrations (id, state, doc) VALUES ($1, $2, $3)
    ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, doc = EXCLUDED.doc, updated_at = now()";

/// Progress records of migrations that did not finish, or failed with cleanup left (read at
/// start-up, so `abort` can still retry that cleanup after a restart).
pub const UNFINISHED: &str = "SELECT doc FROM cellgate.migrations WHERE state NOT IN ('done', 'aborted', 'failed') OR (doc->>'cleanup_pending')::boolean IS TRUE";

/// Rows of the moving cells in a table (the copy's progress).
pub fn count_cells(table: &str, col: &str, cells: &[CellIndex]) -> String {
    format!("SELECT count(*) FROM public.{table} WHERE {}", cell_filter(col, cells))
}

pub fn replica_identity(table: &str, full: bool) -> String {
    format!("ALTER TABLE public.{table} REPLICA IDENTITY {}", if full { "FULL" } else { "DEFAULT" })
}

pub fn drop_subscription(id: &str) -> String {
    format!("DROP SUBSCRIPTION {}", object_name(id))
}

pub fn drop_publication(id: &str) -> String {
    format!("DROP PUBLICATION IF EXISTS {}", object_name(id))
}

/// Delete a table's rows under the cells on a shard that does not own them (leftovers, copies of
/// an aborted migration). `session_replication_role = replica` keeps the fence trigger, which
/// protects exactly these cells there, from refusing the cleanup.
pub fn delete_cells_unfenced(table: &str, col: &str, cells: &[CellIndex]) -> String {
    format!(
        "BEGIN; SET LOCAL session_replication_role = replica; DELETE FROM public.{table} WHERE {}; COMMIT;",
        cell_filter(col, cells)
    )
}

/// Names of the replication objects of one migration (ids are `[a-z0-9]`, checked by the caller).
pub fn object_name(id: &str) -> String {
    format!("cellgate_mig_{id}")
}

pub fn create_publication(id: &str, tables: &[(String, String)], cells: &[CellIndex]) -> String {
    let list: Vec<String> =
        tables.iter().map(|(t, col)| format!("public.{t} WHERE {}", cell_filter(col, cells))).collect();
    format!("CREATE PUBLICATION {} FOR TABLE {}", object_name(id), list.join(", "))
}

/// libpq conninfo value quoting: single quotes and backslashes escaped.
fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// SQL string literal quoting.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The subscription on the target. `conninfo` reaches the source primary from the target server.
pub fn create_subscription(id: &str, conninfo: &str) -> String {
    let name = object_name(id);
    format!(
        "CREATE SUBSCRIPTION {name} CONNECTION {} PUBLICATION {name} WITH (copy_data = true, create_slot = true, slot_name = {})",
        literal(conninfo),
        literal(&name)
    )
}

/// libpq keyword/value conninfo from parts (the subscription stores it in the target's catalog).
pub fn conninfo(host: &str, port: u16, dbname: &str, user: &str, password: Option<&str>) -> String {
    let mut s = format!(
        "host={} port={port} dbname={} user={}",
        conninfo_quote(host),
        conninfo_quote(dbname),
        conninfo_quote(user)
    );
    if let Some(p) = password {
        s += &format!(" password={}", conninfo_quote(p));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_expr_matches_h3o() {
        // Evaluate the SQL expression's arithmetic in Rust for a sample of cells and resolutions.
        let fine: CellIndex = "8f390cb1b091a9b".parse().unwrap();
        for r in 0..=15u8 {
            let h = u64::from(fine) as i64;
            let unused = 3 * (15 - u32::from(r));
            let got = (h & !(15i64 << 52)) | (i64::from(r) << 52) | ((1i64 << unused) - 1);
            let want = fine.parent(h3o::Resolution::try_from(r).unwrap()).unwrap();
            assert_eq!(got as u64, u64::from(want), "resolution {r}");
        }
        assert_eq!(parent_expr("h3", 5), "((h3 & ~(15::bigint << 52)) | (5::bigint << 52) | ((1::bigint << 30) - 1))");
    }

    #[test]
    fn filter_groups_by_resolution() {
        let cells: Vec<CellIndex> =
            ["85390cb3fffffff", "8039fffffffffff", "85390c17fffffff"].iter().map(|c| c.parse().unwrap()).collect();
        let f = cell_filter("h3", &cells);
        assert!(f.starts_with("((("), "{f}");
        assert_eq!(f.matches("= ANY").count(), 2, "{f}");
        assert!(f.contains(&(u64::from(cells[0]) as i64).to_string()));
    }

    #[test]
    fn fence_versions_and_statement_trigger() {
        let cells: Vec<CellIndex> = ["83390cfffffffff"].iter().map(|c| c.parse().unwrap()).collect();
        let f = fence(&[("items".into(), "h3".into())], &cells, "m1", 7);
        assert!(f.contains("LOCK TABLE public.items IN SHARE ROW EXCLUSIVE MODE"), "{f}");
        assert!(f.contains(&format!("({}, 3, 'm1', 7)", u64::from(cells[0]) as i64)), "{f}");
        assert!(f.contains("map_version = EXCLUDED.map_version"), "{f}");
        let t = fence_trigger("items", "h3");
        assert!(t.contains("FOR EACH STATEMENT EXECUTE FUNCTION cellgate.fence_statement()"), "{t}");
        assert!(t.contains("FOR EACH ROW EXECUTE FUNCTION cellgate.fence_items()"), "{t}");
        let s = fence_statement_function();
        assert!(s.contains("current_setting('cellgate.route', true)") && s.contains(FENCE_SQLSTATE), "{s}");
        assert!(s.contains("routed_version < f.map_version"), "{s}");
    }

    #[test]
    fn quoting() {
        assert_eq!(literal("a'b"), "'a''b'");
        assert_eq!(
            conninfo("h", 5, "d", "u", Some("p'w\\")),
            "host='h' port=5 dbname='d' user='u' password='p\\'w\\\\'"
        );
    }
}
