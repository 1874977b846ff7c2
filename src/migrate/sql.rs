//! SQL text for live migration: the row filter (built-in bit operators only: publication row
//! filters forbid user functions), the fence table and triggers, publications, subscriptions.
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
CREATE TABLE IF NOT EXISTS cellgate.migrations (
    id text PRIMARY KEY,
    state text NOT NULL,
    doc jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);";

/// Per-table fence trigger: rejects INSERT/UPDATE/DELETE of rows whose cell (old or new) lies
/// under a fenced cell. Fires for local writes only (not for logical-replication apply, which
/// runs with session_replication_role = replica), so copying into a fenced target still works.
pub fn fence_trigger(table: &str, col: &str) -> String {
    let check = |rec: &str| {
        format!(
            "EXISTS (SELECT 1 FROM cellgate.fenced_cells f WHERE f.cell = (({rec}.{col} & ~(15::bigint << 52)) | (f.res::bigint << 52) | ((1::bigint << (3 * (15 - f.res))) - 1)))"
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
    FOR EACH ROW EXECUTE FUNCTION cellgate.fence_{table}();",
        old = check("OLD"),
        new = check("NEW"),
    )
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
    fn quoting() {
        assert_eq!(literal("a'b"), "'a''b'");
        assert_eq!(
            conninfo("h", 5, "d", "u", Some("p'w\\")),
            "host='h' port=5 dbname='d' user='u' password='p\\'w\\\\'"
        );
    }
}
