//! SQL statement classification: parses request SQL with sqlparser and names the most privileged
//! thing it does (read, write, ddl, session, transaction, unsafe, unparseable). Pure: it touches
//! no backend, no config file and no request; the HTTP layer decides what each class may do.
//!
//! Why a real parser: a keyword prefix check let `WITH x AS (DELETE ...) SELECT ...`, `SELECT ...
//! FOR UPDATE` and `SELECT set_config(...)` through the read-only endpoint, and comments or string
//! literals holding `;` fooled statement splitting. The parse tree is walked in full (CTEs,
//! subqueries, function arguments, ORDER BY, FROM-clause functions), so where a construct hides
//! does not matter.

use std::collections::BTreeSet;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, Query, Select, Set, SetExpr, Statement,
    TableFactor, UtilityOption, Value, Visit, Visitor,
};
use sqlparser::dialect::{MsSqlDialect, PostgreSqlDialect};
use sqlparser::parser::{Parser, ParserError, ParserOptions};

/// SQL dialect of the backend the text is meant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    Postgres,
    SqlServer,
}

/// What a statement text may do, from least to most privileged. The derived order is the
/// "most privileged" order used to fold a multi-statement text into one class:
/// `Read < Write < Ddl < Session < Transaction < Unsafe < Unparseable`.
///
/// Why this order: every class from `Session` up is refused by default everywhere, so their
/// relative order only decides which reason is reported; the ones that can never be allowed
/// (unsafe functions, text we could not understand) win, so the error names the real blocker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Read,
    Write,
    Ddl,
    Session,
    Transaction,
    Unsafe,
    Unparseable,
}

/// Classification of one request text (one or more statements).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Classified {
    /// The most privileged class over all statements of the text.
    pub class: Class,
    /// Human words naming what decided the class, e.g. "INSERT", "WITH ... DELETE",
    /// "SELECT ... FOR UPDATE", "function set_config", "parse error: ...".
    pub kind: String,
    /// True when the text changes transaction-local state (`SET LOCAL`, `SET TRANSACTION`,
    /// `set_config(.., .., true)`) and nothing session-level: such a text may run inside a batch
    /// transaction because its effect ends with it. False for texts with no state change at all.
    pub transaction_scoped: bool,
    /// Number of statements in the text (0 when it did not parse).
    pub statements: usize,
    /// The tables a single plain query reads (names as the server resolves them: unquoted
    /// folded to lowercase, the last part of a qualified name, CTE names left out); `None` when
    /// the text is anything else or reads something that is not a table (a table function,
    /// `TABLE t`) — the read cache's per-table policies (docs/cache.md) need the whole set.
    #[serde(skip)]
    pub relations: Option<Vec<String>>,
}

impl Classified {
    fn unparseable(kind: String) -> Classified {
        Classified { class: Class::Unparseable, kind, transaction_scoped: false, statements: 0, relations: None }
    }
}

/// Functions whose call is refused wherever it appears (class `Unsafe`): they hold or release
/// session-level locks, signal or stop other backends, reach files or other servers, or emit
/// events outside the transaction. An entry is an exact lowercase name or a `prefix*` pattern;
/// a call matches on the last part of its (case-folded) name, so `pg_catalog.pg_read_file` matches.
///
/// `set_config` is not listed: it has its own rule (allowed only with a literal `true` third
/// argument, which makes it transaction-scoped).
pub const DEFAULT_DENIED_FUNCTIONS: &[&str] = &[
    // session-level advisory locks (the *_xact_* variants end with the transaction and stay allowed)
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock*",
    // other backends and the server itself
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_stat_reset*",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_wal_replay_*",
    "pg_log_backend_memory_contexts",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_logical_slot_*",
    "pg_replication_origin_*",
    // other servers
    "dblink*",
    // server files and large objects
    "lo_*",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_*",
    "pg_stat_file",
    "pg_file_*",
    // effects outside the transaction / session state
    "pg_logical_emit_message",
    "pg_notify",
    "setseed",
    // run SQL given as text, which the classifier cannot see
    "query_to_xml*",
    "ts_stat",
    // SQL Server: ad-hoc reads of other servers and files
    "openrowset",
    "opendatasource",
    "openquery",
];

/// Functions that write (class `Write`) even inside a SELECT.
const WRITE_FUNCTIONS: &[&str] = &["nextval", "setval"];

/// T-SQL table hints that take locks beyond a plain read (class `Write`, like `FOR UPDATE`).
const LOCKING_TABLE_HINTS: &[&str] =
    &["updlock", "xlock", "holdlock", "tablock", "tablockx", "serializable", "repeatableread"];

/// Longest parse-error message kept in `kind` (the full text may echo a huge input).
const MAX_ERROR_CHARS: usize = 160;

/// Parser nesting limit (parenthesised expressions, subqueries). sqlparser's default is 50; the
/// same value is set explicitly because it also bounds how deep our walk of the tree recurses.
const RECURSION_LIMIT: usize = 50;

/// Texts up to this length are classified on the caller's stack: their deepest possible tree
/// (one level per 2 bytes, `1+1+...`) needs well under 256 KiB, inside a 2 MiB tokio worker stack.
const INLINE_MAX_BYTES: usize = 8 * 1024;

/// Stack reserved per byte of a longer text (measured worst case ~20 in a debug build).
const STACK_BYTES_PER_SQL_BYTE: usize = 32;

/// Longest text classified at all (4× the default request body limit).
pub const MAX_SQL_BYTES: usize = 4 * 1024 * 1024;

/// Source of policy identities: a cache entry is only valid for the policy it was made with.
static NEXT_POLICY_ID: AtomicU64 = AtomicU64::new(1);

/// Denied-function patterns (defaults plus configured additions).
#[derive(Clone, Debug)]
pub struct Policy {
    exact: HashSet<String>,
    prefixes: Vec<String>,
    /// Identity of this pattern set, part of the `ClassCache` key. Clones share it (same content).
    id: u64,
}

impl Policy {
    /// The default list plus `extra` patterns (exact names or `prefix*`, any case; blank entries
    /// are ignored).
    pub fn with_extra(extra: &[String]) -> Policy {
        let mut exact = HashSet::new();
        let mut prefixes = Vec::new();
        let all = DEFAULT_DENIED_FUNCTIONS.iter().copied().chain(extra.iter().map(String::as_str));
        for p in all {
            let p = p.trim().to_lowercase();
            if p.is_empty() {
                continue;
            }
            match p.strip_suffix('*') {
                Some(prefix) => prefixes.push(prefix.to_string()),
                None => {
                    exact.insert(p);
                }
            }
        }
        Policy { exact, prefixes, id: NEXT_POLICY_ID.fetch_add(1, Ordering::Relaxed) }
    }

    /// Whether a call of `name` (one identifier, any case) is denied.
    pub fn denies(&self, name: &str) -> bool {
        let name = name.to_lowercase();
        self.exact.contains(&name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::with_extra(&[])
    }
}

/// Classifies `sql` for `dialect`. Never panics: a parser failure, an empty or oversized text,
/// or (as a last resort) a panic inside the parser yields `Class::Unparseable`.
pub fn classify(sql: &str, dialect: Dialect, policy: &Policy) -> Classified {
    if sql.len() > MAX_SQL_BYTES {
        return Classified::unparseable(format!("statement too long: {} bytes (limit {MAX_SQL_BYTES})", sql.len()));
    }
    if sql.len() <= INLINE_MAX_BYTES {
        return classify_guarded(sql, dialect, policy);
    }
    // Why a thread: the parser's recursion limit does not bound left-deep operator chains
    // (`1 + 1 + ...` is parsed by a loop), and walking or dropping such a tree recurses once per
    // operator: about 20 bytes of stack per byte of text in a debug build. A text this long gets
    // a stack sized for its worst case; pages are only committed as they are touched.
    let stack = (1 << 20) + sql.len() * STACK_BYTES_PER_SQL_BYTE;
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("sqlclass".to_string())
            .stack_size(stack)
            .spawn_scoped(s, || classify_guarded(sql, dialect, policy));
        match worker {
            Ok(h) => h.join().unwrap_or_else(|_| panicked()),
            Err(e) => Classified::unparseable(format!("parse error: no thread to classify a long statement: {e}")),
        }
    })
}

fn classify_guarded(sql: &str, dialect: Dialect, policy: &Policy) -> Classified {
    // Why catch_unwind: sqlparser is a large hand-written parser fed with untrusted text; a bug
    // in it must cost one refused request, not a worker thread. (A stack overflow aborts and
    // cannot be caught: stack depth is bounded by RECURSION_LIMIT and the stack sizing above.)
    catch_unwind(AssertUnwindSafe(|| classify_unguarded(sql, dialect, policy))).unwrap_or_else(|_| panicked())
}

fn panicked() -> Classified {
    Classified::unparseable("parse error: parser panicked".to_string())
}

fn classify_unguarded(sql: &str, dialect: Dialect, policy: &Policy) -> Classified {
    let statements = match parse(sql, dialect) {
        Ok(s) => s,
        Err(e) => return Classified::unparseable(format!("parse error: {}", short_error(&e))),
    };
    if statements.is_empty() {
        return Classified::unparseable("empty statement".to_string());
    }
    let mut walk = Walk::new(dialect, policy);
    for stmt in &statements {
        walk.root(stmt);
    }
    let plain_query = statements.len() == 1 && matches!(statements[0], Statement::Query(_));
    let relations = (plain_query && walk.class == Class::Read && !walk.opaque_source)
        .then(|| walk.tables.difference(&walk.ctes).cloned().collect());
    Classified {
        class: walk.class,
        kind: walk.kind,
        transaction_scoped: walk.scoped && !walk.unscoped,
        statements: statements.len(),
        relations,
    }
}

/// A table or CTE name as the server resolves it: unquoted names fold to lowercase.
fn relation_name(i: &sqlparser::ast::Ident) -> String {
    if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() }
}

/// `TABLE t` anywhere in a set expression: a table read that is no `TableFactor`.
fn has_table_expr(e: &SetExpr) -> bool {
    match e {
        SetExpr::Table(_) => true,
        SetExpr::SetOperation { left, right, .. } => has_table_expr(left) || has_table_expr(right),
        _ => false,
    }
}

fn parse(sql: &str, dialect: Dialect) -> Result<Vec<Statement>, ParserError> {
    let parser = match dialect {
        Dialect::Postgres => Parser::new(&PostgreSqlDialect {}),
        // T-SQL needs no `;` between statements (`DECLARE @x INT = 1 SELECT @x` is one batch);
        // PostgreSQL does, so there a missing one stays a parse error.
        Dialect::SqlServer => Parser::new(&MsSqlDialect {})
            .with_options(ParserOptions { require_semicolon_stmt_delimiter: false, ..ParserOptions::default() }),
    };
    parser.with_recursion_limit(RECURSION_LIMIT).try_with_sql(sql)?.parse_statements()
}

fn short_error(e: &ParserError) -> String {
    let msg = e.to_string();
    let msg = msg.strip_prefix("sql parser error: ").unwrap_or(&msg);
    let mut out: String = msg.chars().take(MAX_ERROR_CHARS).collect();
    if out.len() < msg.len() {
        out.push_str("...");
    }
    out
}

/// Whether a statement changes session or transaction state, and for how long.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Changes no connection state.
    Stateless,
    /// Changes state that ends with the current transaction.
    Transaction,
    /// Changes state that outlives the transaction (or is unsafe).
    Session,
}

/// The class a statement has on its own, before its contents are looked at.
fn base(stmt: &Statement, dialect: Dialect) -> (Class, &'static str, Scope) {
    use Class::*;
    use Scope::{Session as Sess, Stateless};
    let mssql = dialect == Dialect::SqlServer;
    // Exhaustive on purpose: a sqlparser upgrade that adds a statement kind fails to compile here
    // until someone decides its class.
    match stmt {
        Statement::Query(q) => (Read, query_kind(q), Stateless),
        Statement::Explain { .. } | Statement::ExplainTable { .. } => (Read, "EXPLAIN", Stateless),
        Statement::ShowFunctions { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowProcessList { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCharset(_)
        | Statement::ShowObjects(_)
        | Statement::ShowTables { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowCollation { .. } => (Read, "SHOW", Stateless),
        // T-SQL procedural statements: harmless themselves; what they contain is walked.
        Statement::Case(_) => (Read, "CASE", Stateless),
        Statement::If(_) => (Read, "IF", Stateless),
        Statement::While(_) => (Read, "WHILE", Stateless),
        Statement::Raise(_) => (Read, "RAISE", Stateless),
        Statement::RaisError { .. } => (Read, "RAISERROR", Stateless),
        Statement::Throw(_) => (Read, "THROW", Stateless),
        Statement::Print(_) => (Read, "PRINT", Stateless),
        Statement::Return(_) => (Read, "RETURN", Stateless),
        Statement::WaitFor(_) => (Read, "WAITFOR", Stateless),
        Statement::Assert { .. } => (Read, "ASSERT", Stateless),
        Statement::Declare { stmts, .. } => {
            // A cursor (PostgreSQL: every DECLARE; T-SQL: DECLARE c CURSOR) lives in the session;
            // a T-SQL local variable lives only in the batch.
            let cursor = stmts
                .iter()
                .any(|d| d.for_query.is_some() || matches!(d.declare_type, Some(sqlparser::ast::DeclareType::Cursor)));
            if cursor || !mssql { (Session, "DECLARE CURSOR", Sess) } else { (Read, "DECLARE", Stateless) }
        }

        Statement::Insert(_) => (Write, "INSERT", Stateless),
        Statement::Update(_) => (Write, "UPDATE", Stateless),
        Statement::Delete(_) => (Write, "DELETE", Stateless),
        Statement::Merge(_) => (Write, "MERGE", Stateless),

        // Arbitrary code runs with the caller's rights: the most privileged data class.
        Statement::Call(_) => (Ddl, "CALL", Stateless),
        Statement::Execute { .. } if mssql => (Ddl, "EXEC", Stateless),
        Statement::Truncate(_) => (Ddl, "TRUNCATE", Stateless),
        Statement::Analyze(_) => (Ddl, "ANALYZE", Stateless),
        Statement::Vacuum(_) => (Ddl, "VACUUM", Stateless),
        Statement::Comment { .. } => (Ddl, "COMMENT", Stateless),
        Statement::Grant(_) | Statement::GrantRole(_) => (Ddl, "GRANT", Stateless),
        Statement::Revoke(_) | Statement::RevokeRole(_) => (Ddl, "REVOKE", Stateless),
        Statement::Deny(_) => (Ddl, "DENY", Stateless),
        Statement::AlterDefaultPrivileges(_) => (Ddl, "ALTER DEFAULT PRIVILEGES", Stateless),
        Statement::RefreshMaterializedView(_) => (Ddl, "REFRESH MATERIALIZED VIEW", Stateless),
        Statement::RenameTable(_) => (Ddl, "RENAME TABLE", Stateless),
        Statement::Msck(_) | Statement::OptimizeTable { .. } | Statement::Cache { .. } | Statement::UNCache { .. } => {
            (Ddl, "maintenance", Stateless)
        }
        Statement::CreateView(_)
        | Statement::CreateTable(_)
        | Statement::CreateVirtualTable { .. }
        | Statement::CreateIndex(_)
        | Statement::CreateRole(_)
        | Statement::CreateSecret { .. }
        | Statement::CreateServer(_)
        | Statement::CreateForeignTable(_)
        | Statement::CreateForeignDataWrapper(_)
        | Statement::CreateUserMapping(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateRule(_)
        | Statement::CreateConnector(_)
        | Statement::CreateOperator(_)
        | Statement::CreateOperatorFamily(_)
        | Statement::CreateOperatorClass(_)
        | Statement::CreateTextSearch(_)
        | Statement::CreateAggregate(_)
        | Statement::CreateExtension(_)
        | Statement::CreateCollation(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateFunction(_)
        | Statement::CreateTrigger(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateMacro { .. }
        | Statement::CreateStage { .. }
        | Statement::CreateFileFormat { .. }
        | Statement::CreateWarehouse(_)
        | Statement::CreateSequence { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateType { .. }
        | Statement::CreateUser(_) => (Ddl, "CREATE", Stateless),
        Statement::AlterTable(_)
        | Statement::AlterSchema(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView(_)
        | Statement::AlterFunction(_)
        | Statement::AlterType(_)
        | Statement::AlterCollation(_)
        | Statement::AlterOperator(_)
        | Statement::AlterOperatorFamily(_)
        | Statement::AlterOperatorClass(_)
        | Statement::AlterTextSearch(_)
        | Statement::AlterRole { .. }
        | Statement::AlterPolicy(_)
        | Statement::AlterTrigger(_)
        | Statement::AlterConnector { .. }
        | Statement::AlterUser(_) => (Ddl, "ALTER", Stateless),
        Statement::Drop { .. }
        | Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropProcedure { .. }
        | Statement::DropSecret { .. }
        | Statement::DropPolicy(_)
        | Statement::DropRule(_)
        | Statement::DropConnector { .. }
        | Statement::DropExtension(_)
        | Statement::DropOperator(_)
        | Statement::DropOperatorFamily(_)
        | Statement::DropOperatorClass(_)
        | Statement::DropTrigger(_) => (Ddl, "DROP", Stateless),

        Statement::Set(set) => set_class(set, mssql),
        Statement::Reset(_) => (Session, "RESET", Sess),
        Statement::Discard { .. } => (Session, "DISCARD", Sess),
        Statement::Lock(_) | Statement::LockTables { .. } | Statement::UnlockTables => (Session, "LOCK", Sess),
        Statement::LISTEN { .. } => (Session, "LISTEN", Sess),
        Statement::UNLISTEN { .. } => (Session, "UNLISTEN", Sess),
        Statement::NOTIFY { .. } => (Session, "NOTIFY", Sess),
        Statement::Prepare { .. } => (Session, "PREPARE", Sess),
        Statement::Execute { .. } => (Session, "EXECUTE", Sess),
        Statement::Deallocate { .. } => (Session, "DEALLOCATE", Sess),
        Statement::Use(_) => (Session, "USE", Sess),
        Statement::Fetch { .. } => (Session, "FETCH", Sess),
        Statement::Open(_) => (Session, "OPEN", Sess),
        Statement::Close { .. } => (Session, "CLOSE", Sess),
        Statement::AlterSession { .. } => (Session, "ALTER SESSION", Sess),
        Statement::Pragma { .. } => (Session, "PRAGMA", Sess),

        // T-SQL `BEGIN ... END` is a block of statements (walked), not a transaction.
        Statement::StartTransaction { statements, has_end_keyword, .. }
            if *has_end_keyword || !statements.is_empty() =>
        {
            (Read, "BEGIN ... END", Stateless)
        }
        Statement::StartTransaction { begin: true, .. } => (Transaction, "BEGIN", Sess),
        Statement::StartTransaction { .. } => (Transaction, "START TRANSACTION", Sess),
        Statement::Commit { end: true, .. } => (Transaction, "END", Sess),
        Statement::Commit { .. } => (Transaction, "COMMIT", Sess),
        Statement::Rollback { savepoint: Some(_), .. } => (Transaction, "ROLLBACK TO SAVEPOINT", Sess),
        Statement::Rollback { .. } => (Transaction, "ROLLBACK", Sess),
        Statement::Savepoint { .. } => (Transaction, "SAVEPOINT", Sess),
        Statement::ReleaseSavepoint { .. } => (Transaction, "RELEASE SAVEPOINT", Sess),

        Statement::Copy { .. } | Statement::CopyIntoSnowflake { .. } => (Unsafe, "COPY", Sess),
        Statement::Kill { .. } => (Unsafe, "KILL", Sess),
        // Other dialects' file, extension and server statements: nothing a client of ours needs.
        Statement::Install { .. }
        | Statement::Load { .. }
        | Statement::LoadData { .. }
        | Statement::Directory { .. }
        | Statement::Unload { .. }
        | Statement::ExportData(_)
        | Statement::AttachDatabase { .. }
        | Statement::AttachDuckDBDatabase { .. }
        | Statement::DetachDuckDBDatabase { .. }
        | Statement::Flush { .. }
        | Statement::List(_)
        | Statement::Put { .. }
        | Statement::Remove(_) => (Unsafe, "unsupported statement", Sess),
    }
}

fn query_kind(q: &Query) -> &'static str {
    match q.body.as_ref() {
        SetExpr::Values(_) => "VALUES",
        SetExpr::Table(_) => "TABLE",
        _ => "SELECT",
    }
}

fn set_class(set: &Set, mssql: bool) -> (Class, &'static str, Scope) {
    use sqlparser::ast::ContextModifier;
    let local = |m: &Option<ContextModifier>| matches!(m, Some(ContextModifier::Local));
    match set {
        // T-SQL `SET @v = ...` assigns a batch-local variable.
        Set::SingleAssignment { variable, .. }
            if mssql && variable.0.len() == 1 && last_ident(variable).is_some_and(|v| v.starts_with('@')) =>
        {
            (Class::Read, "SET @variable", Scope::Stateless)
        }
        Set::SingleAssignment { scope, .. } if local(scope) => (Class::Session, "SET LOCAL", Scope::Transaction),
        Set::SetRole { context_modifier, .. } if local(context_modifier) => {
            (Class::Session, "SET LOCAL ROLE", Scope::Transaction)
        }
        Set::SetRole { .. } => (Class::Session, "SET ROLE", Scope::Session),
        Set::SetTimeZone { local: true, .. } => (Class::Session, "SET LOCAL TIME ZONE", Scope::Transaction),
        // T-SQL's SET TRANSACTION ISOLATION LEVEL lasts for the connection, not the transaction.
        Set::SetTransaction { session: false, .. } if !mssql => {
            (Class::Transaction, "SET TRANSACTION", Scope::Transaction)
        }
        Set::SetTransaction { .. } if mssql => (Class::Session, "SET TRANSACTION", Scope::Session),
        Set::SetTransaction { .. } => (Class::Session, "SET SESSION CHARACTERISTICS", Scope::Session),
        Set::SetSessionAuthorization(_) => (Class::Session, "SET SESSION AUTHORIZATION", Scope::Session),
        _ => (Class::Session, "SET", Scope::Session),
    }
}

/// Last identifier of a (possibly qualified) name, as written.
fn last_ident(name: &ObjectName) -> Option<&str> {
    name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.as_str())
}

/// Whether `EXPLAIN` runs its statement: `EXPLAIN ANALYZE ...` or `EXPLAIN (ANALYZE [on]) ...`.
fn explain_runs(analyze: bool, options: &Option<Vec<UtilityOption>>) -> bool {
    analyze
        || options
            .iter()
            .flatten()
            .any(|o| o.name.value.eq_ignore_ascii_case("analyze") && !o.arg.as_ref().is_some_and(is_false_literal))
}

fn is_false_literal(e: &Expr) -> bool {
    let word = |s: &str| matches!(s.to_ascii_lowercase().as_str(), "false" | "off" | "0" | "f" | "no" | "n");
    match e {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => !b,
            Value::Number(n, _) => n == "0",
            Value::SingleQuotedString(s) => word(s),
            _ => false,
        },
        Expr::Identifier(i) => word(&i.value),
        _ => false,
    }
}

fn is_true_literal(e: &Expr) -> bool {
    let word = |s: &str| matches!(s.to_ascii_lowercase().as_str(), "true" | "on" | "1" | "t" | "yes" | "y");
    match e {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => *b,
            Value::SingleQuotedString(s) => word(s),
            _ => false,
        },
        _ => false,
    }
}

/// `set_config(name, value, is_local)` is transaction-scoped only with a literal true `is_local`
/// (positional third argument or `is_local => true`); anything else may outlive the transaction.
fn set_config_is_local(args: &FunctionArguments) -> bool {
    let FunctionArguments::List(list) = args else { return false };
    let is_local = list.args.iter().enumerate().find_map(|(i, a)| match a {
        FunctionArg::Unnamed(e) if i == 2 => Some(e),
        FunctionArg::Named { name, arg, .. } if name.value.eq_ignore_ascii_case("is_local") => Some(arg),
        FunctionArg::ExprNamed { name: Expr::Identifier(name), arg, .. }
            if name.value.eq_ignore_ascii_case("is_local") =>
        {
            Some(arg)
        }
        _ => None,
    });
    matches!(is_local, Some(FunctionArgExpr::Expr(e)) if is_true_literal(e))
}

/// Accumulates the verdict over every statement of a text.
struct Walk<'p> {
    dialect: Dialect,
    policy: &'p Policy,
    class: Class,
    kind: String,
    /// Some transaction-scoped state change was seen.
    scoped: bool,
    /// Some session-level state change (or unsafe call) was seen.
    unscoped: bool,
    /// Depth of queries being visited: a statement inside a query is a data-modifying CTE.
    query_depth: usize,
    /// Tables named in `FROM`/`JOIN` (see [`Classified::relations`]).
    tables: BTreeSet<String>,
    /// Names the text's `WITH` clauses define (not tables).
    ctes: BTreeSet<String>,
    /// Something is read that is not a plain table.
    opaque_source: bool,
}

impl<'p> Walk<'p> {
    fn new(dialect: Dialect, policy: &'p Policy) -> Walk<'p> {
        Walk {
            dialect,
            policy,
            class: Class::Read,
            kind: String::new(),
            scoped: false,
            unscoped: false,
            query_depth: 0,
            tables: BTreeSet::new(),
            ctes: BTreeSet::new(),
            opaque_source: false,
        }
    }

    /// Raises the verdict to `class` (first decider of the highest class keeps the kind).
    fn note(&mut self, class: Class, kind: impl FnOnce() -> String, scope: Scope) {
        match scope {
            Scope::Stateless => {}
            Scope::Transaction => self.scoped = true,
            Scope::Session => self.unscoped = true,
        }
        if class > self.class || self.kind.is_empty() {
            self.class = class;
            self.kind = kind();
        }
    }

    fn root(&mut self, stmt: &Statement) {
        if let Statement::Explain { analyze, options, statement, .. } = stmt {
            if !explain_runs(*analyze, options) {
                // Plain EXPLAIN plans without executing, whatever the statement does.
                self.note(Class::Read, || "EXPLAIN".to_string(), Scope::Stateless);
                return;
            }
            let mut inner = Walk::new(self.dialect, self.policy);
            inner.walk(statement);
            let kind = if inner.class == Class::Read {
                "EXPLAIN ANALYZE".to_string()
            } else {
                format!("EXPLAIN ANALYZE {}", inner.kind)
            };
            self.scoped |= inner.scoped;
            self.unscoped |= inner.unscoped;
            self.note(inner.class, || kind, Scope::Stateless);
            return;
        }
        if matches!(
            stmt,
            Statement::CreateFunction(_)
                | Statement::CreateProcedure { .. }
                | Statement::CreateTrigger(_)
                | Statement::CreateMacro { .. }
        ) {
            // A routine body is stored, not run: its SET NOCOUNT ON or DELETE must not make the
            // definition itself a session or write statement.
            self.note(Class::Ddl, || "CREATE".to_string(), Scope::Stateless);
            return;
        }
        self.walk(stmt);
    }

    fn walk(&mut self, stmt: &Statement) {
        // The visitor never breaks: every node is looked at.
        let _ = stmt.visit(self);
    }

    fn call(&mut self, name: &ObjectName, args: Option<&FunctionArguments>) {
        let Some(last) = last_ident(name) else { return };
        let lower = last.to_lowercase();
        if lower == "set_config" {
            if args.is_some_and(set_config_is_local) {
                self.note(Class::Read, || "function set_config".to_string(), Scope::Transaction);
            } else {
                self.note(Class::Unsafe, || "function set_config".to_string(), Scope::Session);
            }
        } else if self.policy.denies(&lower) {
            self.note(Class::Unsafe, || format!("function {lower}"), Scope::Session);
        } else if WRITE_FUNCTIONS.contains(&lower.as_str()) {
            self.note(Class::Write, || format!("function {lower}"), Scope::Stateless);
        }
    }
}

impl Visitor for Walk<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        let (class, kind, scope) = base(stmt, self.dialect);
        let nested_dml = self.query_depth > 0 && class == Class::Write;
        self.note(class, || if nested_dml { format!("WITH ... {kind}") } else { kind.to_string() }, scope);
        if let Statement::Call(f) = stmt {
            self.call(&f.name, Some(&f.args));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.query_depth += 1;
        if let Some(with) = &query.with {
            self.ctes.extend(with.cte_tables.iter().map(|c| relation_name(&c.alias.name)));
        }
        self.opaque_source |= has_table_expr(&query.body);
        if let Some(lock) = query.locks.first() {
            let kind = format!("SELECT ... FOR {}", lock.lock_type);
            self.note(Class::Write, || kind, Scope::Stateless);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.query_depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_some() {
            self.note(Class::Ddl, || "SELECT ... INTO".to_string(), Scope::Stateless);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            // `FROM f(...)`: a function call in table position.
            TableFactor::Table { name, args, with_hints, .. } => {
                if args.is_some() {
                    self.call(name, None);
                    self.opaque_source = true;
                } else if let Some(last) = name.0.last().and_then(|p| p.as_ident()) {
                    self.tables.insert(relation_name(last));
                } else {
                    self.opaque_source = true;
                }
                for hint in with_hints {
                    if let Expr::Identifier(h) = hint {
                        let h = h.value.to_ascii_lowercase();
                        if LOCKING_TABLE_HINTS.contains(&h.as_str()) {
                            let kind = format!("SELECT ... WITH ({})", h.to_ascii_uppercase());
                            self.note(Class::Write, || kind, Scope::Stateless);
                        }
                    }
                }
            }
            TableFactor::Function { name, .. } => {
                self.call(name, None);
                self.opaque_source = true;
            }
            // Their own tables are visited; the join or subquery itself reads nothing more.
            TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } => {}
            _ => self.opaque_source = true,
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            self.call(&f.name, Some(&f.args));
        }
        ControlFlow::Continue(())
    }
}

/// Entries kept before the cache is cleared (bounded memory, like the prepared-statement caches).
const CACHE_MAX_ENTRIES: usize = 4096;
/// Longer texts are classified every time: 4096 entries × 8 KiB bounds the cache near 32 MiB.
const CACHE_MAX_SQL_BYTES: usize = 8 * 1024;

/// Thread-safe, bounded memo of `classify` keyed by (dialect, policy identity, SQL text).
///
/// Keyed by policy identity so a config reload with new denied functions never reuses verdicts
/// made under the old list. The std hasher (SipHash) is kept on purpose: keys are client text.
#[derive(Default)]
pub struct ClassCache {
    /// Read-locked on every request (hits), write-locked only to insert: hits never wait for
    /// each other.
    inner: RwLock<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    by_scope: HashMap<(Dialect, u64), HashMap<Box<str>, Arc<Classified>>>,
    entries: usize,
}

impl ClassCache {
    pub fn new() -> ClassCache {
        ClassCache::default()
    }

    /// The cached classification of `sql`, classifying (outside the lock) on a miss.
    pub fn get_or_classify(&self, sql: &str, dialect: Dialect, policy: &Policy) -> Arc<Classified> {
        let scope = (dialect, policy.id);
        if let Some(hit) = self.read().by_scope.get(&scope).and_then(|m| m.get(sql)) {
            return hit.clone();
        }
        let verdict = Arc::new(classify(sql, dialect, policy));
        if sql.len() <= CACHE_MAX_SQL_BYTES {
            let mut inner = self.write();
            if inner.entries >= CACHE_MAX_ENTRIES {
                inner.by_scope.clear();
                inner.entries = 0;
            }
            // Two concurrent misses may both classify; the verdicts are equal, the second insert
            // replaces the first without changing the count.
            if inner.by_scope.entry(scope).or_default().insert(sql.into(), verdict.clone()).is_none() {
                inner.entries += 1;
            }
        }
        verdict
    }

    /// Number of cached classifications.
    pub fn len(&self) -> usize {
        self.read().entries
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // Nothing panics while the lock is held; recover anyway rather than poison every request.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, CacheInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CacheInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Class::*;
    use Dialect::{Postgres as Pg, SqlServer as Ms};
    use proptest::prelude::*;

    #[test]
    fn relations_of_plain_queries() {
        let policy = Policy::default();
        let rel = |d, sql: &str| classify(sql, d, &policy).relations;
        let some = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let cases: &[(Dialect, &str, Option<Vec<String>>)] = &[
            (Pg, "SELECT id FROM musicians WHERE h3 = $1", some(&["musicians"])),
            (Pg, "select * from Public.Musicians m join gigs g on g.m = m.id", some(&["gigs", "musicians"])),
            (Pg, "SELECT * FROM \"Musicians\"", some(&["Musicians"])),
            (
                Pg,
                "SELECT * FROM (SELECT id FROM gigs) x WHERE id IN (SELECT gig FROM reviews)",
                some(&["gigs", "reviews"]),
            ),
            (Pg, "WITH near AS (SELECT * FROM venues) SELECT * FROM near", some(&["venues"])),
            (Pg, "SELECT 1", some(&[])),
            (Pg, "SELECT * FROM generate_series(1, 3)", None),
            (Pg, "SELECT * FROM musicians, LATERAL unnest(tags) t", None),
            (Pg, "TABLE musicians", None),
            (Pg, "SELECT 1 UNION TABLE musicians", None),
            (Pg, "SELECT * FROM musicians; SELECT * FROM gigs", None),
            (Pg, "EXPLAIN SELECT * FROM musicians", None),
            (Pg, "SELECT * FROM musicians FOR UPDATE", None),
            (Pg, "DELETE FROM musicians", None),
            (Pg, "SELEC nonsense", None),
            (Ms, "SELECT TOP 5 * FROM dbo.Venues WITH (NOLOCK)", some(&["venues"])),
        ];
        for (d, sql, want) in cases {
            assert_eq!(&rel(*d, sql), want, "{d:?} {sql:?}");
        }
    }

    fn check(cases: &[(Dialect, &str, Class)]) {
        let policy = Policy::default();
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|&(d, sql, want)| {
                let got = classify(sql, d, &policy);
                (got.class != want).then(|| format!("{d:?} {sql:?}: want {want:?}, got {got:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{} misclassified:\n{}", wrong.len(), wrong.join("\n"));
    }

    #[test]
    fn reads() {
        check(&[
            (Pg, "SELECT 1", Read),
            (Pg, "SELECT * FROM items WHERE id = $1", Read),
            (Pg, "VALUES (1), (2)", Read),
            (Pg, "WITH a AS (SELECT 1 AS x) SELECT x FROM a", Read),
            (Pg, "WITH a AS (WITH b AS (SELECT 1) SELECT * FROM b) SELECT * FROM a", Read),
            (Pg, "SHOW search_path", Read),
            (Pg, "EXPLAIN SELECT * FROM t", Read),
            (Pg, "EXPLAIN DELETE FROM t", Read),
            (Pg, "EXPLAIN SELECT pg_advisory_lock(1)", Read),
            (Pg, "EXPLAIN (ANALYZE false) DELETE FROM t", Read),
            (Pg, "EXPLAIN ANALYZE SELECT * FROM t", Read),
            (Pg, "SELECT 1; SELECT 2;", Read),
            (Pg, "SELECT ';DELETE FROM t' AS s", Read),
            (Pg, "SELECT $$ DROP TABLE x $$", Read),
            (Pg, "SELECT $tag$ ; DELETE FROM t; $tag$ AS s", Read),
            (Pg, "/* DELETE */ SELECT 1 -- ; DROP TABLE t", Read),
            (Pg, "SELECT E'it''s ; DROP TABLE t' AS s", Read),
            (Pg, r#"SELECT "DELETE" FROM "drop; table""#, Read),
            (Pg, "SELECT txid_current(), pg_current_xact_id()", Read),
            (Pg, "SELECT pg_advisory_xact_lock(1)", Read),
            (Pg, "SELECT current_setting('search_path')", Read),
            (Pg, "SELECT set_config('a', 'b', true)", Read),
            (Pg, "SELECT pg_catalog.set_config('a', 'b', true)", Read),
            (Pg, "SELECT set_config('a', 'b', is_local => true)", Read),
            (Ms, "SELECT TOP 5 * FROM t WHERE id = @P1", Read),
            (Ms, "SELECT id, name FROM items WHERE id = @P1 AND price > @P2", Read),
            (Ms, "SELECT * FROM t WITH (NOLOCK) WHERE name = @name", Read),
            (Ms, "DECLARE @x INT = 5; SELECT @x", Read),
            (Ms, "DECLARE @x INT = 5\nSELECT @x", Read),
            (Ms, "SELECT 1 SELECT 2", Read),
            (Ms, "SET @x = 1", Read),
            (Ms, "WAITFOR DELAY '00:00:01'", Read),
            (Ms, "RAISE", Read),
            (Ms, "SELECT ';DROP TABLE t' AS s -- ; DROP TABLE t", Read),
            (Ms, "SELECT id FROM t FOR JSON PATH", Read),
        ]);
    }

    #[test]
    fn writes() {
        check(&[
            (Pg, "INSERT INTO t VALUES (1)", Write),
            (Pg, "INSERT INTO t SELECT * FROM u ON CONFLICT DO NOTHING", Write),
            (Pg, "UPDATE t SET a = 1 WHERE id = $1", Write),
            (Pg, "DELETE FROM t WHERE id = $1 RETURNING *", Write),
            (Pg, "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a", Write),
            (Pg, "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", Write),
            (Pg, "WITH x AS (DELETE FROM t RETURNING *) SELECT count(*) FROM x", Write),
            (Pg, "WITH a AS (WITH b AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM b) SELECT * FROM a", Write),
            (Pg, "SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s", Write),
            (Pg, "SELECT * FROM t FOR UPDATE", Write),
            (Pg, "SELECT * FROM t FOR SHARE SKIP LOCKED", Write),
            (Pg, "SELECT * FROM (SELECT * FROM t FOR UPDATE) s", Write),
            (Pg, "EXPLAIN ANALYZE DELETE FROM t", Write),
            (Pg, "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", Write),
            (Pg, "SELECT 1; DELETE FROM t", Write),
            (Pg, "SELECT nextval('s')", Write),
            (Pg, "SELECT id FROM t ORDER BY setval('s', id)", Write),
            (Ms, "INSERT INTO items (id, name) VALUES (@P1, @P2)", Write),
            (Ms, "UPDATE blobs SET b = @P2 WHERE g = @P1", Write),
            (Ms, "SELECT * FROM t WITH (UPDLOCK) WHERE id = 1", Write),
            (Ms, "SELECT * FROM t WITH (XLOCK, ROWLOCK)", Write),
            (Ms, "SELECT * FROM t WITH (HOLDLOCK)", Write),
            (Ms, "IF 1 = 1 DELETE FROM t", Write),
            (Ms, "SELECT 1 DELETE FROM t", Write),
        ]);
    }

    #[test]
    fn ddl() {
        check(&[
            (Pg, "CREATE TABLE t (id int)", Ddl),
            (Pg, "CREATE TABLE t (id int); INSERT INTO t VALUES (1)", Ddl),
            (Pg, "CREATE TEMP TABLE t AS SELECT nextval('s')", Ddl),
            (Pg, "ALTER TABLE t ADD COLUMN a int", Ddl),
            (Pg, "DROP TABLE t", Ddl),
            (Pg, "TRUNCATE t", Ddl),
            (Pg, "GRANT SELECT ON t TO u", Ddl),
            (Pg, "REVOKE SELECT ON t FROM u", Ddl),
            (Pg, "COMMENT ON TABLE t IS 'x'", Ddl),
            (Pg, "VACUUM t", Ddl),
            (Pg, "ANALYZE t", Ddl),
            (Pg, "REFRESH MATERIALIZED VIEW v", Ddl),
            (Pg, "CREATE INDEX i ON t (a)", Ddl),
            (Pg, "SELECT * INTO newt FROM t", Ddl),
            (Pg, "CALL p(1)", Ddl),
            (Pg, "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", Ddl),
            (Ms, "CREATE PROCEDURE p AS BEGIN SET NOCOUNT ON; SELECT 1; END", Ddl),
            (Ms, "CREATE PROCEDURE p AS BEGIN DELETE FROM t; END", Ddl),
            (Ms, "SELECT a INTO #tmp FROM t", Ddl),
            (Ms, "EXEC sp_who", Ddl),
            (Ms, "EXECUTE dbo.p @a = 1", Ddl),
            (Ms, "EXEC('SELECT 1')", Ddl),
            (Ms, "IF OBJECT_ID('dbo.cellgate_t') IS NOT NULL DROP TABLE dbo.cellgate_t", Ddl),
            (Ms, "CREATE TABLE dbo.t (id int PRIMARY KEY, g uniqueidentifier, ts datetimeoffset)", Ddl),
        ]);
    }

    #[test]
    fn session() {
        check(&[
            (Pg, "SET search_path = pg_catalog", Session),
            (Pg, "SET statement_timeout = 0", Session),
            (Pg, "SET SESSION statement_timeout = 0", Session),
            (Pg, "SET LOCAL statement_timeout = 0", Session),
            (Pg, "SET TIME ZONE 'UTC'", Session),
            (Pg, "SET ROLE admin", Session),
            (Pg, "SET SESSION AUTHORIZATION x", Session),
            (Pg, "RESET ALL", Session),
            (Pg, "DISCARD ALL", Session),
            (Pg, "LOCK TABLE t IN ACCESS EXCLUSIVE MODE", Session),
            (Pg, "LISTEN c", Session),
            (Pg, "UNLISTEN *", Session),
            (Pg, "NOTIFY c, 'x'", Session),
            (Pg, "PREPARE p AS SELECT 1", Session),
            (Pg, "EXECUTE p(1)", Session),
            (Pg, "DEALLOCATE p", Session),
            (Pg, "DECLARE c CURSOR FOR SELECT 1", Session),
            (Pg, "SELECT 1; SET search_path = x", Session),
            (Ms, "USE master", Session),
            (Ms, "SET NOCOUNT ON", Session),
            (Ms, "SET NOCOUNT ON SELECT 1", Session),
            (Ms, "SET ANSI_NULLS OFF", Session),
            (Ms, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Session),
            (Pg, "SET LOCAL TIME ZONE 'UTC'", Session),
            (Pg, "FETCH NEXT FROM c", Session),
            (Pg, "CLOSE c", Session),
        ]);
    }

    #[test]
    fn transaction() {
        check(&[
            (Pg, "BEGIN", Transaction),
            (Pg, "BEGIN ISOLATION LEVEL SERIALIZABLE", Transaction),
            (Pg, "START TRANSACTION", Transaction),
            (Pg, "COMMIT", Transaction),
            (Pg, "END", Transaction),
            (Pg, "ROLLBACK", Transaction),
            (Pg, "ABORT", Transaction),
            (Pg, "SAVEPOINT a", Transaction),
            (Pg, "RELEASE SAVEPOINT a", Transaction),
            (Pg, "ROLLBACK TO SAVEPOINT a", Transaction),
            (Pg, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Transaction),
            (Pg, "BEGIN; SET LOCAL a = 1", Transaction),
            (Ms, "BEGIN TRAN", Transaction),
            (Ms, "BEGIN TRANSACTION", Transaction),
            (Ms, "COMMIT TRAN", Transaction),
            (Ms, "ROLLBACK TRAN", Transaction),
        ]);
    }

    #[test]
    fn unsafe_calls() {
        check(&[
            (Pg, "SELECT set_config('search_path', 'x', false)", Unsafe),
            (Pg, "SELECT set_config('search_path', 'x', $1)", Unsafe),
            (Pg, "SELECT set_config('search_path', 'x')", Unsafe),
            (Pg, "SELECT PG_CATALOG.SET_CONFIG('a', 'b', false)", Unsafe),
            (Pg, "SELECT pg_advisory_lock(1)", Unsafe),
            (Pg, "SELECT Pg_Advisory_Lock_Shared(1)", Unsafe),
            (Pg, "SELECT pg_try_advisory_lock(1)", Unsafe),
            (Pg, "SELECT pg_advisory_unlock_all()", Unsafe),
            (Pg, "SELECT * FROM pg_advisory_lock(1)", Unsafe),
            (Pg, "SELECT id FROM t WHERE id IN (SELECT pg_advisory_lock(id) FROM u)", Unsafe),
            (Pg, "WITH a AS (SELECT pg_terminate_backend(pid) FROM pg_stat_activity) SELECT 1", Unsafe),
            (Pg, "SELECT id FROM t ORDER BY pg_cancel_backend(id)", Unsafe),
            (Pg, "SELECT coalesce(pg_reload_conf(), false)", Unsafe),
            (Pg, "SELECT * FROM dblink('x', 'y') AS t(a int)", Unsafe),
            (Pg, "SELECT dblink_exec('x', 'DELETE FROM t')", Unsafe),
            (Pg, "SELECT lo_import('/etc/passwd')", Unsafe),
            (Pg, "SELECT pg_read_file('/etc/passwd')", Unsafe),
            (Pg, "SELECT * FROM pg_ls_dir('.')", Unsafe),
            (Pg, "SELECT pg_ls_waldir()", Unsafe),
            (Pg, "SELECT pg_notify('c', 'x')", Unsafe),
            (Pg, "SELECT 1; SELECT pg_sleep(1), pg_switch_wal()", Unsafe),
            (Pg, "EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", Unsafe),
            (Pg, "INSERT INTO t VALUES (pg_advisory_lock(1))", Unsafe),
            (Pg, "COPY t TO STDOUT", Unsafe),
            (Pg, "COPY t FROM STDIN", Unsafe),
            (Pg, "BEGIN; SELECT pg_advisory_lock(1)", Unsafe),
            (Ms, "SELECT * FROM OPENROWSET('SQLNCLI', 'x', 'SELECT 1') AS a", Unsafe),
        ]);
    }

    #[test]
    fn unparseable() {
        check(&[
            (Pg, "", Unparseable),
            (Pg, "   ", Unparseable),
            (Pg, ";", Unparseable),
            (Pg, "-- only a comment", Unparseable),
            (Pg, "garbage", Unparseable),
            (Pg, "SELEC 1", Unparseable),
            (Pg, "SELECT (1", Unparseable),
            (Pg, "SELECT 'unterminated", Unparseable),
            (Pg, "SELECT 1; garbage", Unparseable),
            (Pg, "COPY t TO STDOUT; )(", Unparseable),
            (Ms, "SLEEP", Unparseable),
            (Ms, "KILL", Unparseable),
        ]);
    }

    #[test]
    fn kinds_name_the_decider() {
        let p = Policy::default();
        for (d, sql, kind) in [
            (Pg, "SELECT 1", "SELECT"),
            (Pg, "INSERT INTO t VALUES (1)", "INSERT"),
            (Pg, "SET search_path = x", "SET"),
            (Pg, "SET LOCAL statement_timeout = 0", "SET LOCAL"),
            (Pg, "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", "WITH ... INSERT"),
            (Pg, "SELECT * FROM t FOR UPDATE", "SELECT ... FOR UPDATE"),
            (Pg, "SELECT * FROM t FOR SHARE", "SELECT ... FOR SHARE"),
            (Pg, "EXPLAIN ANALYZE DELETE FROM t", "EXPLAIN ANALYZE DELETE"),
            (Pg, "EXPLAIN DELETE FROM t", "EXPLAIN"),
            (Pg, "SELECT * INTO newt FROM t", "SELECT ... INTO"),
            (Pg, "SELECT set_config('search_path', 'x', false)", "function set_config"),
            (Pg, "SELECT pg_catalog.pg_advisory_lock(1)", "function pg_advisory_lock"),
            (Pg, "SELECT nextval('s')", "function nextval"),
            (Pg, "COPY t TO STDOUT", "COPY"),
            (Pg, "SELECT 1; DELETE FROM t; UPDATE t SET a = 1", "DELETE"),
            (Pg, "", "empty statement"),
            (Ms, "SELECT * FROM t WITH (UPDLOCK)", "SELECT ... WITH (UPDLOCK)"),
            (Ms, "EXEC sp_who", "EXEC"),
        ] {
            assert_eq!(classify(sql, d, &p).kind, kind, "{d:?} {sql:?}");
        }
        let e = classify("garbage", Pg, &p);
        assert!(e.kind.starts_with("parse error: ") && e.kind.contains("garbage"), "{e:?}");
        let long = format!("SELECT {}", "x ".repeat(10_000) + "(");
        assert!(classify(&long, Pg, &p).kind.len() < MAX_ERROR_CHARS + 40);
    }

    #[test]
    fn transaction_scoped_flag() {
        let p = Policy::default();
        for (d, sql, class, scoped) in [
            (Pg, "SET LOCAL statement_timeout = 0", Session, true),
            (Pg, "SET LOCAL ROLE r", Session, true),
            (Pg, "SET LOCAL TIME ZONE 'UTC'", Session, true),
            (Pg, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Transaction, true),
            (Pg, "SET TRANSACTION READ ONLY; SET LOCAL a = 1; SELECT 1", Transaction, true),
            (Pg, "SELECT set_config('a', 'b', true)", Read, true),
            (Pg, "SELECT set_config('a', 'b', 'on')", Read, true),
            (Pg, "SET statement_timeout = 0", Session, false),
            (Pg, "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", Session, false),
            (Pg, "SET LOCAL a = 1; SET b = 2", Session, false),
            (Pg, "SET LOCAL a = 1; SELECT set_config('b', 'c', false)", Unsafe, false),
            (Pg, "BEGIN; SET LOCAL a = 1", Transaction, false),
            (Pg, "SELECT 1", Read, false),
            (Ms, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Session, false),
        ] {
            let c = classify(sql, d, &p);
            assert_eq!((c.class, c.transaction_scoped), (class, scoped), "{d:?} {sql:?}: {c:?}");
        }
    }

    #[test]
    fn statement_count() {
        let p = Policy::default();
        assert_eq!(classify("SELECT 1", Pg, &p).statements, 1);
        assert_eq!(classify("SELECT 1; SELECT ';'; -- ;\n SELECT 3;", Pg, &p).statements, 3);
        assert_eq!(classify("garbage", Pg, &p).statements, 0);
    }

    #[test]
    fn policy_patterns() {
        let p = Policy::with_extra(&["My_Func".to_string(), "evil_*".to_string(), "  ".to_string()]);
        assert!(p.denies("my_func") && p.denies("MY_FUNC") && p.denies("evil_x") && p.denies("evil_"));
        assert!(!p.denies("my_func2") && !p.denies("evi") && !p.denies("count"));
        // Defaults stay in force.
        assert!(p.denies("pg_advisory_lock") && p.denies("dblink_connect") && p.denies("lo_export"));
        assert!(!Policy::default().denies("my_func"));
        check(&[(Pg, "SELECT my_func(1)", Read)]);
        let c = classify("SELECT s.My_Func(1) FROM t ORDER BY evil_sort(a)", Pg, &p);
        assert_eq!((c.class, c.kind.as_str()), (Unsafe, "function my_func"));
        // Every default entry is honoured, whatever pattern form it has.
        for pat in DEFAULT_DENIED_FUNCTIONS {
            let name = pat.replace('*', "x");
            let c = classify(&format!("SELECT {name}(1)"), Pg, &Policy::default());
            assert_eq!(c.class, Unsafe, "{pat}");
        }
    }

    /// Statements used by the repo's tests, examples and load tests must classify, not fail to parse.
    #[test]
    fn repo_statements() {
        check(&[
            (Pg, "SELECT $1::int4 AS x", Read),
            (Pg, "SELECT count(*) AS n FROM items WHERE id = ANY($1)", Read),
            (Pg, "SELECT id, name, (lat - $1)^2 + (lng - $2)^2 AS dist FROM musicians ORDER BY dist LIMIT 5", Read),
            (Pg, "SELECT id, name, instrument, city FROM musicians WHERE city = $1 ORDER BY id LIMIT 5", Read),
            (Pg, "SELECT pg_backend_pid() AS pid, inet_server_port() AS port, pg_sleep(0.01)::text AS s", Read),
            (Pg, "SELECT pg_sleep(1) IS NULL AS slept", Read),
            (Pg, "SELECT 1 AS x FROM pg_sleep(0.2)", Read),
            (Pg, "SELECT aid, abalance FROM pgbench_accounts WHERE aid BETWEEN $1 AND $2 ORDER BY aid", Read),
            (Pg, "SELECT abalance FROM pgbench_accounts WHERE aid = $1", Read),
            (Pg, "SELECT '(1,2)'::point AS p, NULL::point AS q, interval '1 day' AS i, 1 AS ok", Read),
            (Pg, "SELECT $1::jsonb, $2::int4[]", Read),
            (Pg, "SELECT $1::int4 + $2::int4", Read),
            (
                Pg,
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                Read,
            ),
            (
                Pg,
                "INSERT INTO gig_requests (id, venue_id, title, budget_cents, gig_date, lat, lng, h3) VALUES ($1, 1, $2, 50000, $3, 35.6895, 139.6917, $4) RETURNING id",
                Write,
            ),
            (
                Pg,
                "INSERT INTO items (id, name, v, lat, lng, h3) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, inet_server_port() AS port",
                Write,
            ),
            (Pg, "DELETE FROM cellgate.fenced_cells WHERE cell = ANY($1)", Write),
            (Ms, "SELECT id, price, g, b, ts FROM dbo.cellgate_t WHERE id = @P1", Read),
            (Ms, "SELECT @P1, @P2, @P3, @P4, @P5, @P6", Read),
            (Ms, "INSERT INTO dbo.cellgate_t VALUES (@P1, @P2, @P3, @P4, @P5)", Write),
            (Ms, "UPDATE blobs SET b = @P2, ts = @P3, tso = @P4 WHERE g = @P1", Write),
        ]);
    }

    /// Common PostgreSQL reads that must parse as reads.
    #[test]
    fn common_postgres_reads() {
        check(&[
            (Pg, "SELECT x::int FROM t", Read),
            (Pg, "SELECT ST_Distance(a.geom, ST_SetSRID(ST_MakePoint($1, $2), 4326)::geography) FROM a", Read),
            (Pg, "SELECT id, row_number() OVER (PARTITION BY g ORDER BY ts DESC) FROM t", Read),
            (
                Pg,
                "SELECT sum(x) OVER w FROM t WINDOW w AS (ORDER BY id ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)",
                Read,
            ),
            (Pg, "SELECT * FROM t WHERE name ILIKE $1", Read),
            (Pg, "SELECT * FROM t WHERE id = ANY($1)", Read),
            (Pg, "SELECT doc ->> 'k', doc -> 'a' -> 0, doc #>> '{a,b}' FROM t WHERE doc @> '{\"k\": 1}'", Read),
            (Pg, "SELECT * FROM t ORDER BY id LIMIT $1 OFFSET $2", Read),
            (Pg, "SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b", Read),
            (Pg, "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.t_id = t.id LIMIT 1) l", Read),
            (Pg, "SELECT * FROM generate_series(1, 10) AS g(i)", Read),
            (Pg, "SELECT count(*) FILTER (WHERE x > 0) FROM t", Read),
            (Pg, "SELECT array_agg(x ORDER BY y) FROM t GROUP BY z HAVING count(*) > 1", Read),
            (Pg, "SELECT ts AT TIME ZONE 'UTC', now() - interval '1 hour', date_trunc('day', ts) FROM t", Read),
            (Pg, "SELECT a FROM t UNION ALL SELECT a FROM u EXCEPT SELECT a FROM v", Read),
            (Pg, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", Read),
            (Pg, "SELECT CASE WHEN a IS DISTINCT FROM b THEN 1 ELSE 0 END FROM t", Read),
            (Pg, "SELECT * FROM t WHERE tags && ARRAY['a','b']::text[] AND ts BETWEEN $1 AND $2", Read),
            (Pg, "SELECT * FROM t WHERE name ~* '^a' AND id NOT IN (SELECT id FROM u)", Read),
            (Pg, "SELECT to_jsonb(t.*) FROM t", Read),
            (Pg, "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t", Read),
            (Pg, "SELECT * FROM t TABLESAMPLE SYSTEM (10)", Read),
            (Pg, "SELECT * FROM t FETCH FIRST 5 ROWS ONLY", Read),
        ]);
    }

    /// Legitimate statements sqlparser 0.64 cannot parse: refused as unparseable (the safe side)
    /// unless the database opts in with `pass_unparsed`. When a sqlparser upgrade learns one,
    /// this test fails: move the statement to its class's test.
    #[test]
    fn known_parser_gaps() {
        check(&[
            (Pg, "TABLE t", Unparseable),
            (Pg, "SELECT * FROM t FOR NO KEY UPDATE", Unparseable),
            (Pg, "SELECT * FROM t FOR KEY SHARE", Unparseable),
            (Pg, "DO $$ BEGIN END $$", Unparseable),
            (Pg, "CLUSTER t", Unparseable),
            (Pg, "REINDEX TABLE t", Unparseable),
            (Pg, "PREPARE TRANSACTION 'x'", Unparseable),
            (Pg, "COMMIT PREPARED 'x'", Unparseable),
            (Ms, "SAVE TRAN a", Unparseable),
            (Ms, "SAVE TRANSACTION a", Unparseable),
            // T-SQL statements inside a block must end with `;` for sqlparser (T-SQL allows none).
            (Ms, "CREATE PROCEDURE p AS BEGIN SET NOCOUNT ON\nSELECT 1\nEND", Unparseable),
            (Ms, "CREATE PROCEDURE p AS BEGIN SET NOCOUNT ON; SELECT 1 END", Unparseable),
        ]);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let p = Policy::default();
        for depth in [60, 1_000, 100_000] {
            let parens = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
            assert_eq!(classify(&parens, Pg, &p).class, Unparseable, "parens {depth}");
            let subq = format!("SELECT {}1{}", "(SELECT ".repeat(depth), ")".repeat(depth));
            assert_eq!(classify(&subq, Pg, &p).class, Unparseable, "subqueries {depth}");
        }
        // Within the limit: still classified.
        let ok = format!("SELECT {}pg_advisory_lock(1){}", "(".repeat(20), ")".repeat(20));
        assert_eq!(classify(&ok, Pg, &p).class, Unsafe);
    }

    /// Left-deep operator chains are built by a loop, not recursion, so the parser's recursion
    /// limit does not bound them: they must still be walked (and dropped) on a small stack.
    #[test]
    fn long_operator_chains_fit_a_worker_stack() {
        let sql = format!("SELECT {}1 FROM t", "1 + ".repeat(100_000));
        let chain_and = format!("SELECT 1 WHERE {}true", "a = 1 AND ".repeat(50_000));
        // The longest text classified on the caller's stack, at 2 bytes per level.
        let inline = format!("SELECT {}1", "1+".repeat((INLINE_MAX_BYTES - 8) / 2));
        assert!(inline.len() <= INLINE_MAX_BYTES);
        let out = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024) // tokio's default worker stack
            .spawn(move || {
                let p = Policy::default();
                assert_eq!(classify(&inline, Pg, &p).class, Read);
                (classify(&sql, Pg, &p).class, classify(&chain_and, Pg, &p).class)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(out, (Read, Read));
        let too_long = " ".repeat(MAX_SQL_BYTES + 1);
        let c = classify(&too_long, Pg, &Policy::default());
        assert_eq!(c.class, Unparseable);
        assert!(c.kind.starts_with("statement too long"), "{c:?}");
    }

    #[test]
    fn cache_reuses_and_separates() {
        let cache = ClassCache::new();
        let p = Policy::default();
        let a = cache.get_or_classify("SELECT 1", Pg, &p);
        let b = cache.get_or_classify("SELECT 1", Pg, &p);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.len(), 1);
        // Dialect and policy are part of the key.
        let ms = cache.get_or_classify("SELECT 1", Ms, &p);
        assert!(!Arc::ptr_eq(&a, &ms));
        let strict = Policy::with_extra(&["f".to_string()]);
        assert_eq!(cache.get_or_classify("SELECT f()", Pg, &p).class, Read);
        assert_eq!(cache.get_or_classify("SELECT f()", Pg, &strict).class, Unsafe);
        assert_eq!(cache.len(), 4);
        // Long texts are classified but not kept.
        let long = format!("SELECT 1 -- {}", "x".repeat(CACHE_MAX_SQL_BYTES));
        assert_eq!(cache.get_or_classify(&long, Pg, &p).class, Read);
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn cache_is_bounded() {
        let cache = ClassCache::new();
        let p = Policy::default();
        for i in 0..CACHE_MAX_ENTRIES + 10 {
            cache.get_or_classify(&format!("SELECT {i}"), Pg, &p);
            assert!(cache.len() <= CACHE_MAX_ENTRIES);
        }
        assert_eq!(cache.len(), 10);
        assert_eq!(cache.get_or_classify("SELECT 5", Pg, &p).class, Read);
    }

    fn sqlish() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("SELECT"),
            Just("INSERT"),
            Just("INTO"),
            Just("VALUES"),
            Just("WITH"),
            Just("AS"),
            Just("FROM"),
            Just("WHERE"),
            Just("DELETE"),
            Just("UPDATE"),
            Just("SET"),
            Just("LOCAL"),
            Just("FOR"),
            Just("EXPLAIN"),
            Just("ANALYZE"),
            Just("BEGIN"),
            Just("END"),
            Just("COPY"),
            Just("TABLE"),
            Just("TOP"),
            Just("EXEC"),
            Just("DECLARE"),
            Just("CASE"),
            Just("WHEN"),
            Just("("),
            Just(")"),
            Just(","),
            Just(";"),
            Just("'"),
            Just("''"),
            Just("\""),
            Just("$$"),
            Just("$1"),
            Just("@P1"),
            Just("@x"),
            Just("::"),
            Just("->>"),
            Just("*"),
            Just("+"),
            Just("--"),
            Just("/*"),
            Just("*/"),
            Just("\n"),
            Just("1"),
            Just("t"),
            Just("set_config"),
            Just("pg_advisory_lock"),
            Just("true"),
            Just("["),
            Just("]"),
            Just("#tmp"),
            Just("N'x'"),
        ];
        prop::collection::vec(token, 0..40).prop_map(|t| t.join(" "))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        // The unguarded path: a panic inside sqlparser fails here instead of hiding behind
        // classify's catch_unwind.
        #[test]
        fn arbitrary_text_never_panics(sql in any::<String>(), ms in any::<bool>()) {
            let d = if ms { Ms } else { Pg };
            let c = classify_unguarded(&sql, d, &Policy::default());
            prop_assert!(c.class != Unparseable || c.statements == 0);
        }

        #[test]
        fn token_soup_never_panics(sql in sqlish(), ms in any::<bool>()) {
            let d = if ms { Ms } else { Pg };
            let c = classify_unguarded(&sql, d, &Policy::default());
            prop_assert!(c.class != Unparseable || c.statements == 0);
        }
    }
}
