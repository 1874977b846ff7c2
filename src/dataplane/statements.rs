//! Statement policy: which SQL each endpoint runs, decided from the classifier's verdict
//! (`sqlclass`, each distinct text parsed once) **before any backend is touched**. `/query` runs
//! reads only; `/execute` runs reads, writes and (with the `ddl` scope) DDL; session and
//! transaction control, denied functions and unparseable SQL run nowhere — except a
//! transaction-scoped `SET LOCAL` / `SET TRANSACTION` / `set_config(.., .., true)` inside a batch,
//! which dies with the batch's transaction. docs/statements.md is the user's view of this.

use super::ApiError;
use crate::app::AppState;
use crate::shardmap::DbKind;
use crate::sqlclass::{Class, Classified, Dialect};

fn dialect(kind: DbKind) -> Dialect {
    match kind {
        DbKind::Sqlserver => Dialect::SqlServer,
        DbKind::Postgres | DbKind::Mongodb => Dialect::Postgres,
    }
}

fn verdict(state: &AppState, kind: DbKind, sql: &str) -> std::sync::Arc<Classified> {
    state.sql_classes.get_or_classify(sql, dialect(kind), &state.sql_policy)
}

fn pass_unparsed(state: &AppState, db: &str) -> bool {
    state.config.sql.pass_unparsed.iter().any(|d| d == db)
}

fn class_words(c: Class) -> &'static str {
    match c {
        Class::Read => "a read",
        Class::Write => "a write",
        Class::Ddl => "DDL",
        Class::Session => "session control",
        Class::Transaction => "transaction control",
        Class::Unsafe => "a call cellgate refuses",
        Class::Unparseable => "SQL cellgate cannot parse",
    }
}

/// `/query`: the text must be a read. Anything else is refused naming what it is. The verdict
/// (with the tables the read reads) on success.
pub fn check_read(state: &AppState, db: &str, kind: DbKind, sql: &str) -> Result<std::sync::Arc<Classified>, ApiError> {
    let v = verdict(state, kind, sql);
    match v.class {
        Class::Read => Ok(v),
        // Opted in: the server's read-only transaction is then the only guard.
        Class::Unparseable if pass_unparsed(state, db) => Ok(v),
        c => Err(ApiError::NotARead(format!(
            "/query runs reads only; this statement is {} ({}){}",
            class_words(c),
            v.kind,
            match c {
                Class::Write | Class::Ddl => ": send it to /execute",
                _ => "",
            }
        ))),
    }
}

/// `/execute`: every statement of the request must be one the endpoint runs. `allow_ddl` is
/// whether the token has the `ddl` scope.
pub fn check_write(
    state: &AppState,
    db: &str,
    kind: DbKind,
    stmts: &[(String, Vec<serde_json::Value>)],
    allow_ddl: bool,
) -> Result<(), ApiError> {
    let batch = stmts.len() > 1;
    for (i, (sql, _)) in stmts.iter().enumerate() {
        let v = verdict(state, kind, sql);
        let at = if batch { format!("statement {i}: ") } else { String::new() };
        let refused = |why: &str| {
            Err(ApiError::StatementRefused(format!("{at}{} ({}) is refused: {why}", class_words(v.class), v.kind)))
        };
        match v.class {
            Class::Read | Class::Write => {}
            Class::Ddl if allow_ddl => {}
            Class::Ddl => return Err(ApiError::Forbidden("ddl")),
            Class::Session | Class::Transaction if batch && v.transaction_scoped => {}
            Class::Session => {
                return refused(
                    "it would change a pooled connection other clients use next (SET LOCAL inside a batch is allowed)",
                );
            }
            Class::Transaction => {
                return refused("each request is one transaction already; send the statements as one batch");
            }
            Class::Unsafe => return refused("it changes session or server state or reaches outside the database"),
            Class::Unparseable if pass_unparsed(state, db) => {}
            Class::Unparseable => {
                return refused("the statement parser cannot read it (a database can opt in with [sql] pass_unparsed)");
            }
        }
    }
    Ok(())
}

/// Does any statement of a write change more than the rows of its region's cell? DDL
/// (`TRUNCATE`, `ALTER`, ...) and SQL the parser cannot read are taken to change the whole
/// shard's database; the read cache then moves the shard's version (docs/cache.md).
pub fn shard_wide(state: &AppState, kind: DbKind, stmts: &[(String, Vec<serde_json::Value>)]) -> bool {
    stmts.iter().any(|(sql, _)| matches!(verdict(state, kind, sql).class, Class::Ddl | Class::Unparseable))
}
