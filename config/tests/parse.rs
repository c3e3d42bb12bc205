//! Rules of the job file, one test per rule, through the public API only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_config::{ConfigError, JobSpec, SnapshotMode, SslMode};

const CANARY: &str = "Canary-pw_7f3a";

const HEAD: &str = r#"name = "shop"

[source]
url = "postgresql://replicator@127.0.0.1:5432/shop"

[target]
url = "postgresql://app@127.0.0.1:5433/shop"
"#;

fn ok(text: &str) -> JobSpec {
    JobSpec::parse(text, Some(Path::new("job.toml"))).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> ConfigError {
    match JobSpec::parse(text, Some(Path::new("job.toml"))) {
        Ok(spec) => panic!("parsed: {spec:?}"),
        Err(e) => e,
    }
}

/// `HEAD` plus more lines; returns the error as displayed.
fn err_with(extra: &str) -> String {
    err(&format!("{HEAD}{extra}")).to_string()
}

#[test]
fn defaults_are_filled() {
    let spec = ok(HEAD);
    assert_eq!(spec.name, "shop");
    assert_eq!(spec.path.as_deref(), Some(Path::new("job.toml")));
    assert_eq!(spec.data_dir, PathBuf::from("./cutover-data"));
    assert_eq!(spec.source.tables, vec!["public.*".to_owned()]);
    assert_eq!(spec.source.conn.password_env, None);
    assert_eq!(spec.target.schema, None);
    assert!(spec.tables.is_empty());
    assert_eq!(spec.snapshot.mode, SnapshotMode::Initial);
    assert_eq!(spec.snapshot.parallelism, 4);
    assert_eq!(spec.target.apply_sessions, 1);
    assert_eq!(spec.verify.every, Duration::from_secs(600));
    assert_eq!(spec.ready.max_lag, Duration::from_secs(5));
    assert_eq!(spec.ready.max_verify_age, Duration::from_secs(1800));
    assert_eq!(spec.changelog.dir, PathBuf::from("./cutover-data/shop/log"));
    assert_eq!(spec.api.listen.to_string(), "127.0.0.1:7432");
    assert_eq!(spec.api.token_env, None);
    assert_eq!(spec.source.conn.origin.url_line, Some(4));
    assert_eq!(spec.target.conn.origin.url_line, Some(7));
    assert_eq!(spec.target.conn.origin.section, "[target]");
    assert_eq!(spec.source.conn.endpoint(), "127.0.0.1:5432/shop");
}

#[test]
fn full_file_sets_every_key() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/jobs/valid/full.toml"
    ));
    let spec = JobSpec::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.name, "shop_v2-full");
    assert_eq!(spec.data_dir, PathBuf::from("/var/lib/cutover"));
    assert_eq!(
        spec.source.conn.password_env.as_deref(),
        Some("SOURCE_PGPASSWORD")
    );
    assert_eq!(
        spec.source.tables,
        vec!["public.*".to_owned(), "billing.invoice*".to_owned()]
    );
    assert_eq!(
        spec.target.conn.password_env.as_deref(),
        Some("TARGET_PGPASSWORD")
    );
    assert_eq!(spec.target.schema.as_deref(), Some("v2"));
    assert!(spec.target.create_tables);
    assert_eq!(spec.tables.len(), 3);
    let orders = &spec.tables[0];
    assert_eq!(orders.source, "public.orders");
    assert_eq!(orders.target.as_deref(), Some("v2.orders"));
    assert_eq!(orders.filter.as_deref(), Some("created_at >= '2020-01-01'"));
    assert_eq!(
        orders.columns,
        BTreeMap::from([
            ("customer_id".to_owned(), "customer_id".to_owned()),
            ("total_cents".to_owned(), "(total * 100)::bigint".to_owned()),
        ])
    );
    assert_eq!(orders.line, 16);
    assert_eq!(spec.tables[1].source, r#"public."Order Items""#);
    assert_eq!(
        spec.tables[1].source_name(),
        Some(("public".into(), "Order Items".into()))
    );
    assert_eq!(
        spec.table_target(&spec.tables[1]),
        Some(("v2".into(), "order_items".into()))
    );
    assert_eq!(
        spec.table_target(&spec.tables[2]),
        Some(("v2".into(), "customers".into()))
    );
    assert_eq!(spec.snapshot.mode, SnapshotMode::Never);
    assert_eq!(spec.snapshot.parallelism, 8);
    assert_eq!(spec.verify.every, Duration::from_secs(5400));
    assert_eq!(spec.ready.max_lag, Duration::from_millis(500));
    assert_eq!(spec.ready.max_verify_age, Duration::from_secs(7200));
    assert_eq!(spec.changelog.dir, PathBuf::from("/srv/cutover/log"));
    assert_eq!(spec.api.listen.to_string(), "0.0.0.0:9432");
    assert_eq!(spec.api.token_env.as_deref(), Some("CUTOVER_API_TOKEN"));

    let env = |name: &str| match name {
        "SOURCE_PGPASSWORD" => Some("s3cret".to_owned()),
        "TARGET_PGPASSWORD" => Some("t3cret".to_owned()),
        _ => None,
    };
    let source = spec
        .source
        .conn
        .resolve_with(env)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(source.endpoint(), "db-old.example.com:5432/shop");
    assert_eq!(source.sslmode, SslMode::VerifyFull);
    assert_eq!(source.password.as_ref().map(|p| p.expose()), Some("s3cret"));
    let target = spec
        .target
        .conn
        .resolve_with(env)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(target.endpoint(), "db-new.example.com:5433/shop");
    assert_eq!(
        (target.user.as_str(), target.sslmode),
        ("app", SslMode::Require)
    );
    assert_eq!(target.connect_timeout, Some(Duration::from_secs(10)));
}

#[test]
fn without_a_path_the_file_is_called_job() {
    let e = JobSpec::parse("name = 1", None).unwrap_err();
    assert_eq!(e.file(), "<job>");
    assert!(
        e.to_string()
            .starts_with("<job>:1: name must be a string, not 1"),
        "{e}"
    );
    assert_eq!(ok(HEAD).source.conn.origin.file, "job.toml");
    assert_eq!(JobSpec::parse(HEAD, None).map(|s| s.path), Ok(None));
}

#[test]
fn unknown_keys_name_the_table_and_the_nearest_key() {
    let e = err(&format!("{HEAD}\n[ready]\nmax_lagg = \"5s\"\n"));
    assert_eq!(e.line(), Some(10));
    assert_eq!(e.primary(), "unknown key \"max_lagg\" in [ready]");
    assert_eq!(e.hint(), Some("did you mean \"max_lag\"?"));

    for (extra, expected) in [
        (
            "\n[snapshot]\nmod = \"never\"\n",
            "unknown key \"mod\" in [snapshot]; hint: did you mean \"mode\"?",
        ),
        (
            "\n[verify]\nevry = \"1m\"\n",
            "unknown key \"evry\" in [verify]; hint: did you mean \"every\"?",
        ),
        (
            "\n[changelog]\ndirectory = \"x\"\n",
            "unknown key \"directory\" in [changelog]; hint: valid keys in [changelog]: dir",
        ),
        (
            "\n[api]\nlsten = \"x\"\n",
            "unknown key \"lsten\" in [api]; hint: did you mean \"listen\"?",
        ),
        (
            "\n[api]\ntoken = \"x\"\n",
            "unknown key \"token\" in [api]; hint: keep tokens out of the job file",
        ),
        (
            "\n[[table]]\nsource = \"a\"\ncolumn = {}\n",
            "unknown key \"column\" in [[table]]; hint: did you mean \"columns\"?",
        ),
        (
            "\n[verify]\nmax_lag = \"5s\"\n",
            "unknown key \"max_lag\" in [verify]; hint: \"max_lag\" belongs in [ready]",
        ),
        (
            "\n[bogus]\nx = 1\n",
            "unknown key \"bogus\"; hint: valid top-level keys: name, data_dir",
        ),
        (
            "\n[target.extra]\nx = 1\n",
            "unknown key \"extra\" in [target]; hint: valid keys in [target]: url, password_env, schema",
        ),
        (
            "\n[Ready]\nmax_lag = \"5s\"\n",
            "unknown key \"Ready\"; hint: did you mean \"ready\"?",
        ),
    ] {
        let text = err_with(extra);
        let body = text.split_once(": ").map_or("", |(_, b)| b);
        assert!(
            body.starts_with(expected),
            "{extra:?}:\n  got  {text}\n  want {expected}"
        );
    }
    // Top-level `url` belongs in two sections.
    let e = err(&format!("url = \"x\"\n{HEAD}"));
    assert_eq!(e.hint(), Some("\"url\" belongs in [source] or [target]"));
    // Dotted keys and inline tables are located as well as headers.
    let e = err(&format!("ready.max_lagg = \"5s\"\n{HEAD}"));
    assert_eq!(
        (e.line(), e.primary()),
        (Some(1), "unknown key \"max_lagg\" in [ready]")
    );
    // After [target], `ready.x` is `target.ready.x`.
    let e = err(&format!("{HEAD}ready.max_lag = \"5s\"\n"));
    assert_eq!(
        (e.line(), e.primary()),
        (Some(8), "unknown key \"ready\" in [target]")
    );
    assert!(e.hint().is_some_and(|h| h.contains("top-level key")), "{e}");
    let e = err("name = \"x\"\nready = { max_lagg = \"5s\" }\n");
    assert_eq!(
        (e.line(), e.primary()),
        (Some(2), "unknown key \"max_lagg\" in [ready]")
    );
}

#[test]
fn missing_sections_and_keys() {
    let e = err("");
    assert_eq!((e.line(), e.primary()), (Some(1), "missing key \"name\""));
    let e = err("name = \"x\"\n\n[target]\nurl = \"postgresql://h/db\"\n");
    assert_eq!(
        (e.line(), e.primary()),
        (Some(1), "missing section [source]")
    );
    let e = err("name = \"x\"\n[source]\nurl = \"postgresql://h/db\"\n");
    assert_eq!(
        (e.line(), e.primary()),
        (Some(1), "missing section [target]")
    );
    let e = err(
        "name = \"x\"\n\n[source]\ntables = [\"a.*\"]\n[target]\nurl = \"postgresql://h/db\"\n",
    );
    assert_eq!(
        (e.line(), e.primary()),
        (Some(3), "missing key \"url\" in [source]")
    );
    assert_eq!(
        e.hint(),
        Some("add url = \"postgresql://user@host:5432/db\" to [source]")
    );
    let e = err(&format!("{HEAD}\n[[table]]\ntarget = \"x\"\n"));
    assert_eq!(
        (e.line(), e.primary()),
        (Some(9), "missing key \"source\" in [[table]]")
    );
}

#[test]
fn durations() {
    let spec = ok(&format!(
        "{HEAD}[verify]\nevery = \"0\"\n[ready]\nmax_lag = \"250ms\"\nmax_verify_age = \"1d\"\n"
    ));
    assert_eq!(spec.verify.every, Duration::ZERO);
    assert_eq!(spec.ready.max_lag, Duration::from_millis(250));
    assert_eq!(spec.ready.max_verify_age, Duration::from_secs(86_400));

    assert_eq!(
        err_with("[ready]\nmax_lag = \"5 seconds\"\n"),
        "job.toml:9: invalid duration \"5 seconds\" for [ready] max_lag; hint: write a number with a unit: \"500ms\", \"5s\", \"10m\", \"2h\""
    );
    assert_eq!(
        err_with("[ready]\nmax_lag = 5\n"),
        "job.toml:9: invalid duration 5 for [ready] max_lag; hint: write a string with a unit, e.g. \"5s\" for 5 seconds"
    );
    assert_eq!(
        err_with("[ready]\nmax_verify_age = \"30\"\n"),
        "job.toml:9: invalid duration \"30\" for [ready] max_verify_age; hint: write a number with a unit, e.g. \"30s\" for 30 seconds"
    );
    assert!(err_with("[verify]\nevery = 0\n").ends_with("hint: write \"0\" (in quotes)"));
    assert!(
        err_with("[verify]\nevery = true\n").contains("invalid duration true for [verify] every")
    );
    assert!(err_with("[verify]\nevery = \"-1s\"\n").contains("invalid duration \"-1s\""));
}

#[test]
fn job_names() {
    for good in ["a", "shop-v2", "shop_v2", "0", &"x".repeat(48)] {
        assert_eq!(
            ok(&HEAD.replace("\"shop\"", &format!("{good:?}"))).name,
            good
        );
    }
    let named = |name: &str| err(&HEAD.replace("name = \"shop\"", &format!("name = {name}")));
    let e = named("\"Shop V2\"");
    assert_eq!(e.line(), Some(1));
    assert!(
        e.primary()
            .starts_with("invalid name \"Shop V2\": only a-z, 0-9"),
        "{e}"
    );
    assert!(e.primary().contains("replication slot"), "{e}");
    assert_eq!(e.hint(), Some("write name = \"shop_v2\""));
    let e = named(&format!("\"{}\"", "ab".repeat(30)));
    assert_eq!(
        e.primary(),
        "name is 60 characters long, at most 48 are allowed, because it names the replication slot and the publication"
    );
    assert_eq!(
        e.hint().map(str::to_owned),
        Some(format!("write name = \"{}\"", "ab".repeat(24)))
    );
    let e = named("\"\"");
    assert!(e.primary().starts_with("name is empty"), "{e}");
    let e = named("\"shop\\\"; DROP\"");
    assert_eq!(e.hint(), Some("write name = \"shop___drop\""));
    let e = named("\"héllo\"");
    assert_eq!(e.hint(), Some("write name = \"h_llo\""));
    let e = named("42");
    assert_eq!(e.primary(), "name must be a string, not 42");
}

#[test]
fn table_names_and_duplicates() {
    let spec = ok(&format!(
        "{HEAD}[[table]]\nsource = 'public.\"Odd \"\"Name\"\"\"'\ntarget = '\"V2\".\"Odd\"'\n[[table]]\nsource = \"orders\"\n"
    ));
    assert_eq!(spec.tables[0].source, r#"public."Odd ""Name""""#);
    assert_eq!(
        spec.tables[0].source_name(),
        Some(("public".into(), "Odd \"Name\"".into()))
    );
    assert_eq!(
        spec.table_target(&spec.tables[0]),
        Some(("V2".into(), "Odd".into()))
    );
    assert_eq!(spec.tables[0].line, 8);
    assert_eq!(spec.tables[1].line, 11);

    for bad in ["a.b.c", "a b", "a;b", "\"open", "a.", "\"\"", "1t", "a--b"] {
        let e = err_with(&format!("[[table]]\nsource = {bad:?}\n"));
        assert!(
            e.contains(&format!("invalid table name {bad:?} in [[table]] source")),
            "{e}"
        );
        assert!(e.starts_with("job.toml:9: "), "{e}");
    }
    let e = err_with("[[table]]\nsource = \"a\"\ntarget = \"x y\"\n");
    assert!(
        e.starts_with("job.toml:10: invalid table name \"x y\" in [[table]] target"),
        "{e}"
    );

    // Same source, spelt differently.
    let e = err_with(
        "[[table]]\nsource = \"public.t\"\ntarget = \"a\"\n[[table]]\nsource = \"t\"\ntarget = \"b\"\n",
    );
    assert_eq!(
        e,
        "job.toml:12: source table public.t is mapped twice: here and by the [[table]] at line 8; hint: keep one [[table]] entry per source table"
    );
    // Same target: explicit, and implied by name.
    let e =
        err_with("[[table]]\nsource = \"a.t\"\n[[table]]\nsource = \"b.u\"\ntarget = \"a.t\"\n");
    assert!(
        e.starts_with(
            "job.toml:12: target table a.t is mapped twice: here and by the [[table]] at line 8"
        ),
        "{e}"
    );
    // With [target] schema, two schemas' tables of one name collide.
    let text = HEAD.replace("5433/shop\"\n", "5433/shop\"\nschema = \"v2\"\n");
    let e = err(&format!(
        "{text}[[table]]\nsource = \"a.t\"\n[[table]]\nsource = \"b.t\"\n"
    ));
    assert_eq!(e.line(), Some(11));
    assert!(
        e.primary().starts_with("target table v2.t is mapped twice"),
        "{e}"
    );
    // Without it, they do not.
    ok(&format!(
        "{HEAD}[[table]]\nsource = \"a.t\"\n[[table]]\nsource = \"b.t\"\n"
    ));
    // Quoted upper case differs from bare lower case only when the catalog says so:
    // bare names are taken as written, so "T" and T are the same table.
    let e = err_with("[[table]]\nsource = '\"T\"'\n[[table]]\nsource = \"T\"\n");
    assert!(
        e.contains("source table public.\"T\" is mapped twice"),
        "{e}"
    );
}

#[test]
fn columns_and_filters() {
    let spec = ok(&format!(
        "{HEAD}[[table]]\nsource = \"t\"\nwhere = \"id > 0\"\n[table.columns]\na = \"b\"\n\"Odd Col\" = \"c || d\"\n"
    ));
    assert_eq!(spec.tables[0].filter.as_deref(), Some("id > 0"));
    assert_eq!(
        spec.tables[0].columns.get("Odd Col").map(String::as_str),
        Some("c || d")
    );

    let e = err_with("[[table]]\nsource = \"t\"\n[table.columns]\na = 1\n");
    assert_eq!(
        e,
        "job.toml:11: [table.columns] a must be a string holding an SQL expression, not 1; hint: write a = \"source_column\" or an SQL expression over source columns"
    );
    assert!(
        err_with("[[table]]\nsource = \"t\"\n[table.columns]\na = \" \"\n")
            .contains("[table.columns] a is empty")
    );
    assert!(
        err_with("[[table]]\nsource = \"t\"\n[table.columns]\n\"\" = \"x\"\n")
            .contains("empty column name")
    );
    let long = "c".repeat(64);
    assert!(
        err_with(&format!(
            "[[table]]\nsource = \"t\"\n[table.columns]\n{long} = \"x\"\n"
        ))
        .contains("64 bytes long")
    );
    assert!(
        err_with("[[table]]\nsource = \"t\"\nwhere = \"\"\n").contains("[[table]] where is empty")
    );
    assert!(
        err_with("[[table]]\nsource = \"t\"\nwhere = 1\n")
            .contains("[[table]] where must be a string, not 1")
    );
    let e = err_with("[[table]]\nsource = \"t\"\ncolumns = 5\n");
    assert_eq!(
        e.split_once("; hint").map(|p| p.0),
        Some("job.toml:10: [table.columns] must be a table, not an integer")
    );
    let e = err_with("[[table]]\nsource = \"t\"\n[[table.columns]]\n");
    assert!(
        e.contains("[table.columns] must be a table, not an array"),
        "{e}"
    );
    let e = err_with("table = [1]\n");
    assert!(
        e.contains("unknown key \"table\" in [target]"),
        "keys after [target] belong to it: {e}"
    );
    let e = err(&format!("table = [1]\n{HEAD}"));
    assert!(
        e.primary()
            .contains("each [[table]] entry must be a table, not an integer"),
        "{e}"
    );
}

#[test]
fn snapshot_settings() {
    let spec = ok(&format!(
        "{HEAD}[snapshot]\nmode = \"never\"\nparallelism = 64\n"
    ));
    assert_eq!(
        (spec.snapshot.mode, spec.snapshot.parallelism),
        (SnapshotMode::Never, 64)
    );
    assert_eq!(
        ok(&format!("{HEAD}[snapshot]\nparallelism = 1\n"))
            .snapshot
            .parallelism,
        1
    );

    let e = err_with("[snapshot]\nmode = \"full\"\n");
    assert_eq!(
        e,
        "job.toml:9: invalid [snapshot] mode \"full\"; hint: use \"initial\" (copy the tables, then stream) or \"never\" (stream only)"
    );
    assert!(err_with("[snapshot]\nmode = 1\n").contains("[snapshot] mode must be a string, not 1"));
    for (value, hint) in [
        ("0", "write parallelism = 1 or more"),
        ("65", "write parallelism = 64 or less"),
        ("-3", "write parallelism = 1 or more"),
        ("\"8\"", "write parallelism = 8 without quotes"),
        ("\"four\"", "write parallelism = 4"),
        ("2.5", "write parallelism = 4"),
    ] {
        let e = err(&format!("{HEAD}[snapshot]\nparallelism = {value}\n"));
        assert_eq!(e.line(), Some(9));
        assert_eq!(
            e.primary(),
            format!("[snapshot] parallelism must be an integer from 1 to 64, not {value}")
        );
        assert_eq!(e.hint(), Some(hint));
    }
}

#[test]
fn apply_sessions_is_one_or_two() {
    // HEAD ends inside [target] (line 7 is its url).
    assert_eq!(
        ok(&format!("{HEAD}apply_sessions = 2\n"))
            .target
            .apply_sessions,
        2
    );
    for (value, hint) in [
        ("0", "write apply_sessions = 1 or more"),
        ("3", "write apply_sessions = 2 or less"),
        ("\"1\"", "write apply_sessions = 1 without quotes"),
        ("true", "write apply_sessions = 1"),
    ] {
        let e = err(&format!("{HEAD}apply_sessions = {value}\n"));
        assert_eq!(e.line(), Some(8), "{e}");
        assert_eq!(
            e.primary(),
            format!("[target] apply_sessions must be an integer from 1 to 2, not {value}")
        );
        assert_eq!(e.hint(), Some(hint));
    }
}

#[test]
fn split_larger_than_is_a_size() {
    assert_eq!(ok(HEAD).snapshot.split_larger_than, 4 << 30);
    let split = |value: &str| format!("{HEAD}[snapshot]\nsplit_larger_than = {value}\n");
    assert_eq!(
        ok(&split("\"512MB\"")).snapshot.split_larger_than,
        512 << 20
    );
    assert_eq!(ok(&split("\"1 TB\"")).snapshot.split_larger_than, 1 << 40);
    for (value, primary, hint) in [
        (
            "\"64kB\"",
            "[snapshot] split_larger_than must be at least 1MB, not \"64kB\"",
            "write split_larger_than = \"1MB\" or more; tables smaller than that gain nothing from being split",
        ),
        (
            "\"512\"",
            "invalid size \"512\" for [snapshot] split_larger_than",
            "write a number with a unit, e.g. \"512MB\"",
        ),
        (
            "4",
            "invalid size 4 for [snapshot] split_larger_than",
            "write a string with a unit, e.g. \"4GB\"",
        ),
        (
            "\"1.5GB\"",
            "invalid size \"1.5GB\" for [snapshot] split_larger_than",
            "write a whole number with a unit: \"512MB\", \"4GB\", \"1TB\"",
        ),
    ] {
        let e = err(&split(value));
        assert_eq!(e.line(), Some(9), "{value}");
        assert_eq!(e.primary(), primary);
        assert_eq!(e.hint(), Some(hint));
    }
}

#[test]
fn source_and_target_settings() {
    let spec = ok(&HEAD.replace(
        "5432/shop\"\n",
        "5432/shop\"\npassword_env = \"SRC_PW\"\ntables = [\"public.*\", '\"Sales\".\"Q*\"', \"orders\"]\n",
    ));
    assert_eq!(spec.source.conn.password_env.as_deref(), Some("SRC_PW"));
    assert_eq!(spec.source.conn.origin.password_env_line, Some(5));
    assert_eq!(spec.source.tables.len(), 3);
    let spec = ok(&HEAD.replace("5433/shop\"\n", "5433/shop\"\nschema = '\"New Schema\"'\n"));
    assert_eq!(spec.target.schema.as_deref(), Some("New Schema"));

    let src = |extra: &str| err(&HEAD.replace("5432/shop\"\n", &format!("5432/shop\"\n{extra}\n")));
    assert!(
        src("tables = []")
            .primary()
            .contains("[source] tables is empty")
    );
    assert!(
        src("tables = \"public.*\"")
            .primary()
            .contains("must be an array of strings")
    );
    assert!(
        src("tables = [1]")
            .primary()
            .contains("[source] tables must hold strings, not 1")
    );
    assert!(
        src("tables = [\"a b\"]")
            .primary()
            .contains("invalid table pattern \"a b\"")
    );
    assert!(
        src("password_env = 5")
            .primary()
            .contains("[source] password_env must be a string, not an integer")
    );
    let tgt = |extra: &str| err(&HEAD.replace("5433/shop\"\n", &format!("5433/shop\"\n{extra}\n")));
    assert!(
        tgt("schema = \"a.b\"")
            .primary()
            .contains("must be a single name")
    );
    assert!(
        tgt("schema = \"a b\"")
            .primary()
            .contains("invalid [target] schema")
    );
    assert!(
        tgt("password_env = \"1X\"")
            .primary()
            .contains("[target] password_env must be the name")
    );
    let e = err(&HEAD.replace("127.0.0.1:5433/shop", "127.0.0.1:5433/shop?sslmod=require"));
    assert_eq!(
        e.to_string(),
        "job.toml:7: invalid [target] url: unknown parameter \"sslmod\"; hint: did you mean \"sslmode\"?"
    );
    assert!(
        err(&HEAD.replace("\"postgresql://app@127.0.0.1:5433/shop\"", "5"))
            .primary()
            .contains("[target] url must be a string, not an integer")
    );
}

#[test]
fn data_dir_changelog_and_api() {
    let spec = ok(&format!("data_dir = \"/d\"\n{HEAD}"));
    assert_eq!(spec.changelog.dir, PathBuf::from("/d/shop/log"));
    assert!(
        err(&format!("data_dir = \"\"\n{HEAD}"))
            .primary()
            .contains("data_dir is empty")
    );
    assert!(
        err(&format!("data_dir = 1\n{HEAD}"))
            .primary()
            .contains("data_dir must be a string, not 1")
    );
    assert!(err_with("[changelog]\ndir = \"\"\n").contains("[changelog] dir is empty"));

    let spec = ok(&format!("{HEAD}[api]\nlisten = \"[::1]:8000\"\n"));
    assert_eq!(spec.api.listen.to_string(), "[::1]:8000");
    let spec = ok(&format!(
        "{HEAD}[api]\nlisten = \"10.0.0.5:8000\"\ntoken_env = \"TOKEN\"\n"
    ));
    assert_eq!(spec.api.token_env.as_deref(), Some("TOKEN"));
    assert_eq!(
        err_with("[api]\nlisten = \"localhost:7000\"\n"),
        "job.toml:9: invalid address \"localhost:7000\" for [api] listen; hint: write listen = \"127.0.0.1:7000\""
    );
    assert!(
        err_with("[api]\nlisten = \"7432\"\n").contains("hint: write an IP address and a port")
    );
    assert!(err_with("[api]\nlisten = \"0.0.0.0:7432\"\n").contains("no token_env is set"));
    let e = err_with(&format!("[api]\ntoken_env = \"{CANARY}!\"\n"));
    assert!(
        e.contains("[api] token_env must be the name of an environment variable"),
        "{e}"
    );
    assert!(!e.contains(CANARY), "{e}");
}

#[test]
fn toml_syntax_errors_point_at_the_line() {
    let e = err("name = \"x\"\n\n[source\n");
    assert_eq!(e.line(), Some(3));
    assert_eq!(e.primary(), "unclosed table, expected `]`");
    let e = err("name = \"x\"\nname = \"y\"\n");
    assert_eq!((e.line(), e.primary()), (Some(2), "duplicate key \"name\""));
    let e = err(&format!("{HEAD}[source]\n"));
    assert_eq!(
        (e.line(), e.primary()),
        (Some(8), "section [source] appears twice")
    );
    let e = err("name = \"x\n");
    assert_eq!(e.line(), Some(1));
    assert!(e.primary().starts_with("invalid basic string"), "{e}");
}

#[test]
fn structure_errors_do_not_echo_values() {
    let e = err(&format!(
        "name = \"x\"\nsource = \"postgresql://u:{CANARY}@h/db\"\n"
    ));
    assert_eq!(
        e.to_string(),
        "job.toml:2: source must be a section, not a string; hint: write [source] on a line of its own, with its keys on the lines below"
    );
    let e = err(&format!(
        "name = \"x\"\ntarget = [\"postgresql://u:{CANARY}@h/db\"]\n[source]\nurl=\"postgresql://h\"\n"
    ));
    assert!(
        e.primary()
            .starts_with("target must be a section, not an array"),
        "{e}"
    );
    let e = err(&format!("{HEAD}[table]\nsource = \"x\"\n"));
    assert_eq!(
        e.primary(),
        "table must be an array of tables, not a single table"
    );
}

/// A password written into the url never shows in `Debug` of the spec, nor in any
/// error, however the file is broken.
#[test]
fn url_passwords_never_show() {
    let good = format!(
        "name = \"shop\"\n[source]\nurl = \"postgresql://rep:{CANARY}@h/db\"\n[target]\nurl = \"host=h password='{CANARY}'\"\n"
    );
    let spec = ok(&good);
    let debug = format!("{spec:?} {spec:#?}");
    assert!(!debug.contains(CANARY), "{debug}");
    let params = spec
        .source
        .conn
        .resolve_with(|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(params.password.as_ref().map(|p| p.expose()), Some(CANARY));
    assert!(!format!("{params:?} {}", params.endpoint()).contains(CANARY));

    let broken = [
        format!("postgresql://rep:{CANARY}@h/db?bogus=1"),
        format!("postgresql://rep:{CANARY}/x@h/db"),
        format!("postgresql://rep:{CANARY}@a@h/db"),
        format!("postgresql://rep:{CANARY}@h:port/db"),
        format!("postgresql://rep:{CANARY}@h1,h2/db"),
        format!("postgresql://rep:{CANARY}%@h/db"),
        format!("host=h password={CANARY} x"),
        format!("host=h password={CANARY} {CANARY}=1"),
        format!("host=h password='{CANARY}"),
        format!("mysql://rep:{CANARY}@h/db"),
        CANARY.to_string(),
    ];
    for url in &broken {
        let text = good.replacen(&format!("postgresql://rep:{CANARY}@h/db"), url, 1);
        let e = err(&text);
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains(CANARY) && !shown.contains("Canary"),
            "{url:?}: {shown}"
        );
        assert_eq!(e.line(), Some(3), "{url:?}: {shown}");
        assert!(e.primary().starts_with("invalid [source] url: "), "{shown}");
    }
    // Broken TOML around the url.
    for text in [
        format!("name = \"x\"\n[source]\nurl = postgresql://rep:{CANARY}@h/db\n"),
        format!("name = \"x\"\n[source]\nurl = \"postgresql://rep:{CANARY}@h/db\n"),
        format!("name = \"x\"\n[source]\nurl = 'postgresql://rep:{CANARY}@h/db' x\n"),
        format!("name = \"x\"\n[source]\nurl = [\"postgresql://rep:{CANARY}@h/db\"]\n"),
        format!("name = \"x\"\n[source]\nurl = {{ u = \"postgresql://rep:{CANARY}@h/db\" }}\n"),
        format!("name = \"x\"\n[source]\n\"postgresql://rep:{CANARY}@h/db\" = 1\n"),
    ] {
        let e = err(&text);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("Canary"), "{text:?}: {shown}");
    }
}

#[test]
fn resolve_errors_point_at_the_job_file() {
    let text = HEAD.replace("5432/shop\"\n", "5432/shop\"\npassword_env = \"SRC_PW\"\n");
    let spec = ok(&text);
    let e = spec.source.conn.resolve_with(|_| None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "job.toml:5: environment variable SRC_PW named by [source] password_env is not set; hint: export SRC_PW with the password before starting cutover, or remove password_env to use PGPASSWORD or ~/.pgpass"
    );
    let e = spec
        .source
        .conn
        .resolve_with(|k| (k == "SRC_PW").then(String::new))
        .unwrap_err();
    assert!(e.primary().ends_with("password_env is empty"), "{e}");
}

#[test]
fn load_reports_unreadable_files() {
    let e = JobSpec::load(Path::new("no/such/job.toml")).unwrap_err();
    assert_eq!(e.file(), "no/such/job.toml");
    assert_eq!(e.line(), None);
    assert!(e.primary().starts_with("could not read job file: "), "{e}");
    assert!(
        e.to_string()
            .starts_with("no/such/job.toml: could not read job file: "),
        "{e}"
    );
    assert_eq!(
        e.hint(),
        Some("check the path; it is relative to the current directory")
    );

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let e = JobSpec::load(dir.path()).unwrap_err();
    assert!(e.primary().starts_with("could not read job file"), "{e}");

    let file = dir.path().join("job.toml");
    std::fs::write(&file, b"name = \"x\"\n# \xff\n").unwrap_or_else(|e| panic!("{e}"));
    let e = JobSpec::load(&file).unwrap_err();
    assert_eq!(
        (e.line(), e.primary()),
        (Some(2), "job file is not valid UTF-8")
    );

    std::fs::write(&file, HEAD).unwrap_or_else(|e| panic!("{e}"));
    let spec = JobSpec::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.path.as_deref(), Some(file.as_path()));
    assert_eq!(spec.source.conn.origin.file, file.display().to_string());
}

#[test]
fn every_error_is_one_line() {
    let e = err("name = \"a\nb\"\n");
    assert!(!e.to_string().contains('\n'), "{e}");
    let e = err(&format!("{HEAD}[[table]]\nsource = \"x\\ny\"\n"));
    assert!(!e.to_string().contains('\n'), "{e}");
}
