//! SQL statement classification: parses request SQL with sqlparser and names the most privileged
//! thing it does (read, write, ddl, session, transaction, unsafe, unparseable). Pure: it touches
//! no backend, no config file and no request; the HTTP layer decides what each class may do.
//!
//! Why a real parser: a keyword prefix check let `WITH x AS (DELETE ...) SELECT ...`, `SELECT ...
//! FOR UPDATE` and `SELECT set_config(...)` through the read-only endpoint, and comments or string
//! literals holding `;` fooled statement splitting. The parse tree is walked in full (CTEs,
//! subqueries, function arguments, ORDER BY, FROM-clause functions), so where a construct hides
//! does not matter.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, Query, Select, Set, SetExpr,
    Statement, TableFactor, UtilityOption, Value, Visit, Visitor,
};
use sqlparser::dialect::{MsSqlDialect, PostgreSqlDialect};
use sqlparser::parser::{Parser, ParserError};

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
}

impl Classified {
    fn unparseable(kind: String) -> Classified {
        Classified { class: Class::Unparseable, kind, transaction_scoped: false, statements: 0 }
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

/// Classifies `sql` for `dialect`. Never panics: a parser failure, an empty text, or (as a last
/// resort) a panic inside the parser yields `Class::Unparseable`.
pub fn classify(sql: &str, dialect: Dialect, policy: &Policy) -> Classified {
    // Why catch_unwind: sqlparser is a large hand-written parser fed with untrusted text; a bug
    // in it must cost one refused request, not a worker thread. Stack depth is bounded
    // separately by RECURSION_LIMIT (a stack overflow aborts and cannot be caught).
    catch_unwind(AssertUnwindSafe(|| classify_unguarded(sql, dialect, policy)))
        .unwrap_or_else(|_| Classified::unparseable("parse error: parser panicked".to_string()))
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
    Classified {
        class: walk.class,
        kind: walk.kind,
        transaction_scoped: walk.scoped && !walk.unscoped,
        statements: statements.len(),
    }
}

fn parse(sql: &str, dialect: Dialect) -> Result<Vec<Statement>, ParserError> {
    let parser = match dialect {
        Dialect::Postgres => Parser::new(&PostgreSqlDialect {}),
        Dialect::SqlServer => Parser::new(&MsSqlDialect {}),
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
            let cursor = stmts.iter().any(|d| {
                d.for_query.is_some()
                    || matches!(d.declare_type, Some(sqlparser::ast::DeclareType::Cursor))
            });
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
        Statement::Msck(_)
        | Statement::OptimizeTable { .. }
        | Statement::Cache { .. }
        | Statement::UNCache { .. } => (Ddl, "maintenance", Stateless),
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
        Statement::Lock(_) | Statement::LockTables { .. } | Statement::UnlockTables => {
            (Session, "LOCK", Sess)
        }
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
        || options.iter().flatten().any(|o| {
            o.name.value.eq_ignore_ascii_case("analyze") && !o.arg.as_ref().is_some_and(is_false_literal)
        })
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
            TableFactor::Function { name, .. } => self.call(name, None),
            _ => {}
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
    inner: Mutex<CacheInner>,
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
        if let Some(hit) = self.lock().by_scope.get(&scope).and_then(|m| m.get(sql)) {
            return hit.clone();
        }
        let verdict = Arc::new(classify(sql, dialect, policy));
        if sql.len() <= CACHE_MAX_SQL_BYTES {
            let mut inner = self.lock();
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
        self.lock().entries
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // Nothing panics while the lock is held; recover anyway rather than poison every request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Class::*;
    use Dialect::{Postgres as Pg, SqlServer as Ms};

    #[test]
    fn explore() {
        let p = Policy::default();
        for (d, sql) in [
            (Pg, "SELECT x::int FROM t"),
            (Ms, "BEGIN SELECT 1; SELECT 2; END"),
            (Ms, "BEGIN TRAN"),
            (Ms, "BEGIN TRANSACTION"),
            (Ms, "COMMIT TRAN"),
            (Ms, "SAVE TRAN a"),
            (Ms, "SAVE TRANSACTION a"),
            (Ms, "ROLLBACK TRAN"),
            (Ms, "SELECT * FROM t WITH (UPDLOCK) WHERE id = 1"),
            (Ms, "EXEC sp_who"),
            (Ms, "EXEC('SELECT 1')"),
            (Ms, "SET @x = 1"),
            (Ms, "DECLARE @x INT = 5"),
            (Ms, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            (Ms, "WAITFOR DELAY '00:00:01'"),
            (Ms, "CREATE PROCEDURE p AS BEGIN SET NOCOUNT ON; SELECT 1 END"),
            (Pg, "PREPARE TRANSACTION 'x'"),
            (Pg, "COMMIT PREPARED 'x'"),
            (Pg, "ABORT"),
            (Pg, "END"),
            (Pg, "DO $$ BEGIN END $$"),
            (Pg, "CLUSTER t"),
            (Pg, "REINDEX TABLE t"),
            (Pg, "VACUUM t"),
            (Pg, "ANALYZE t"),
            (Pg, "REFRESH MATERIALIZED VIEW v"),
            (Pg, "SELECT * FROM t FOR NO KEY UPDATE"),
            (Pg, "SELECT * FROM t FOR KEY SHARE"),
            (Pg, "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t"),
            (Pg, "EXPLAIN (ANALYZE false) DELETE FROM t"),
            (Pg, "SELECT * FROM pg_advisory_lock(1)"),
            (Pg, "SELECT * FROM dblink('x', 'y') AS t(a int)"),
            (Pg, "RELEASE SAVEPOINT a"),
            (Pg, "RELEASE a"),
            (Pg, "SET TIME ZONE 'UTC'"),
            (Pg, "SET SESSION AUTHORIZATION x"),
            (Pg, "RESET ALL"),
            (Pg, "DISCARD ALL"),
            (Pg, "LOCK TABLE t IN ACCESS EXCLUSIVE MODE"),
            (Pg, "LISTEN c"),
            (Pg, "NOTIFY c, 'x'"),
            (Pg, "UNLISTEN *"),
            (Pg, "DEALLOCATE p"),
            (Pg, "EXECUTE p(1)"),
            (Pg, "PREPARE p AS SELECT 1"),
            (Pg, "DECLARE c CURSOR FOR SELECT 1"),
            (Pg, "SELECT set_config('a', 'b', is_local => true)"),
            (Pg, "TABLE t"),
            (Pg, "VALUES (1)"),
            (Pg, "SHOW search_path"),
            (Pg, "CALL p()"),
            (Pg, "GRANT SELECT ON t TO u"),
            (Pg, "COMMENT ON TABLE t IS 'x'"),
            (Pg, "TRUNCATE t"),
            (Pg, "SELECT 1; SELECT 2;"),
            (Pg, ";"),
            (Pg, "-- c"),
        ] {
            let c = classify(sql, d, &p);
            println!("{d:?} {sql:60} => {:?} {:?} scoped={} n={}", c.class, c.kind, c.transaction_scoped, c.statements);
        }
    }
}
