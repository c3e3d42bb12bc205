//! End to end without a database: `COPY … TO STDOUT` text of both sides → rows → chunked
//! comparison → the `verify --json` document.

use cutover_verifier::canonical::table_domain;
use cutover_verifier::chunk::{ColumnOrder, CompareOptions, KeyOrder, Row, Value, compare_keyed};
use cutover_verifier::copy_text::{CopyLines, CopyTextError, parse_row};
use cutover_verifier::report::{TableReport, VerifyReport};

/// Rows of `(id int, name text, balance float8)` keyed by `id`, as COPY text split across
/// arbitrary payload boundaries.
fn rows(copy: &[u8]) -> Vec<Result<Row, CopyTextError>> {
    let mut lines = CopyLines::new();
    let mut out = Vec::new();
    for payload in copy.chunks(7) {
        lines.push(payload, |line| out.push(parse_row(line, 3, &[0])));
    }
    if let Err(error) = lines.finish() {
        out.push(Err(error));
    }
    out
}

#[test]
fn copy_text_to_report() {
    let source = b"1\talice\t10\n2\t\\N\t0\n9\tcarol\t-0\n10\t\t1.5\n11\tNULL\t2\n12\tx\\tz\t3\n";
    let target = b"1\talice\t10\n2\t\t0\n9\tcarol\t0\n10\t\t1.5\n12\tx\\tz\t3\n13\tnew\t4\n";
    let order = KeyOrder::new(vec![ColumnOrder::Integer]);
    let outcome = compare_keyed(
        &table_domain("public", "accounts", 1),
        rows(source),
        rows(target),
        |a: &[Value], b: &[Value]| order.compare(a, b),
        &CompareOptions {
            chunk_rows: 2,
            max_differences: 100,
            ..Default::default()
        },
    )
    .expect("comparison");
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let table = TableReport::keyed(
        "public.accounts",
        "public.accounts",
        &names(&["id"]),
        &names(&["id", "name", "balance"]),
        &outcome,
    );
    let report = VerifyReport::new(Some("0/3000060".into()), vec![table]);
    assert_eq!(
        serde_json::to_value(&report).expect("json"),
        serde_json::json!({
            "lsn": "0/3000060",
            "equal": false,
            "tables": [{
                "source": "public.accounts",
                "target": "public.accounts",
                "rows_compared": 7,
                "equal": false,
                "differences": [
                    {"kind": "different", "key": {"id": "2"}, "columns": ["name"]},
                    {"kind": "different", "key": {"id": "9"}, "columns": ["balance"]},
                    {"kind": "missing", "key": {"id": "11"}, "columns": []},
                    {"kind": "extra", "key": {"id": "13"}, "columns": []}
                ],
                "differences_total": 4
            }]
        })
    );
}

#[test]
fn identical_copy_streams_are_equal() {
    let copy = b"1\ta\t\\N\n2\tb\t\n3\t\\\\N\tNULL\n";
    let order = KeyOrder::new(vec![ColumnOrder::Integer]);
    let outcome = compare_keyed(
        b"t",
        rows(copy),
        rows(copy),
        |a: &[Value], b: &[Value]| order.compare(a, b),
        &CompareOptions::default(),
    )
    .expect("comparison");
    assert!(outcome.is_equal());
    assert_eq!(outcome.rows_compared, 3);
    assert_eq!(outcome.chunks_differing, 0);
}

#[test]
fn truncated_copy_stream_is_an_error() {
    let order = KeyOrder::bytes();
    let error = compare_keyed(
        b"t",
        rows(b"1\ta\tb\n"),
        rows(b"1\ta\tb\n2\tc"),
        |a: &[Value], b: &[Value]| order.compare(a, b),
        &CompareOptions::default(),
    )
    .expect_err("truncated target");
    assert!(error.to_string().contains("target"), "{error}");
}
