//! Runs the bench binary in quick mode with tiny sizes against the real
//! PostgreSQL and NATS, and checks the shape of its table (every row, a
//! ratio on each measured line), never the figures: those depend on the
//! machine.

use std::process::Command;

/// Row labels, as `flotilla_bench::Row::label` prints them.
fn labels() -> Vec<&'static str> {
    flotilla_bench::Row::ALL.iter().map(|r| r.label()).collect()
}

#[test]
fn quick_mode_prints_every_row_with_a_ratio_or_the_reason_it_was_not_measured() {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-bench"))
        .args([
            "--quick",
            "--instances",
            "40",
            "--scan-sizes",
            "2000",
            "--memory-instances",
            "300",
            "--seconds",
            "1",
        ])
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    println!("{stdout}");

    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ")).collect();
    let header = lines.first().expect("a header line");
    assert!(
        header.contains("raw limit") && header.contains("ratio"),
        "{header}"
    );
    for label in labels() {
        let rows: Vec<&&str> = lines.iter().filter(|l| l.contains(label)).collect();
        assert!(!rows.is_empty(), "no line for {label}:\n{stdout}");
        for row in rows {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            // ["", row, figure, raw, ratio, target, met, ""]
            assert_eq!(cells.len(), 8, "{row}");
            if cells[2].starts_with("not measured") {
                assert!(cells[2].len() > "not measured: ".len(), "no reason: {row}");
            } else {
                assert!(!cells[3].is_empty(), "no raw limit: {row}");
                assert!(cells[4].contains('x'), "no ratio: {row}");
                assert!(matches!(cells[6], "met" | "NOT MET" | "(info)"), "{row}");
            }
        }
    }
    // The database and NATS servers are there, so the in-process rows
    // must have been measured.
    for label in [
        "requested -> ready",
        "Provision -> provider create",
        "heartbeat ingest",
        "dead worker -> worker_dead",
        "watchdog stale scan",
    ] {
        assert!(
            lines
                .iter()
                .filter(|l| l.contains(label))
                .all(|l| !l.contains("not measured")),
            "{label} not measured:\n{stdout}\n{stderr}"
        );
    }
}
