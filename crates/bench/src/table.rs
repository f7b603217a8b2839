//! The one table the bench prints: each figure, the raw limit of this
//! machine measured in the same run, their ratio, the target and whether
//! it was met.

use std::fmt;

/// One printed line of the table.
#[derive(Debug, Clone)]
pub struct Line {
    pub row: String,
    pub figure: String,
    pub raw: String,
    /// `None` only for a line that could not be measured.
    pub ratio: Option<String>,
    pub target: String,
    /// `None`: no target for this line (informational).
    pub met: Option<bool>,
    pub not_measured: Option<String>,
}

impl Line {
    pub fn new(
        row: impl Into<String>,
        figure: impl Into<String>,
        raw: impl Into<String>,
        ratio: impl Into<String>,
        target: impl Into<String>,
        met: Option<bool>,
    ) -> Line {
        Line {
            row: row.into(),
            figure: figure.into(),
            raw: raw.into(),
            ratio: Some(ratio.into()),
            target: target.into(),
            met,
            not_measured: None,
        }
    }

    pub fn not_measured(row: impl Into<String>, reason: impl Into<String>) -> Line {
        // Keep the table one line per row: the first line of the reason.
        let reason: String = reason.into();
        let reason = reason.lines().next().unwrap_or("").to_owned();
        Line {
            row: row.into(),
            figure: "not measured".into(),
            raw: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
            not_measured: Some(reason),
        }
    }

    fn met_text(&self) -> &'static str {
        match (self.not_measured.is_some(), self.met) {
            (true, _) => "-",
            (false, Some(true)) => "met",
            (false, Some(false)) => "NOT MET",
            (false, None) => "(info)",
        }
    }

    /// One line for progress output.
    pub fn summary(&self) -> String {
        match &self.not_measured {
            Some(why) => format!("{}: not measured ({why})", self.row),
            None => format!(
                "{}: {} | raw {} | ratio {} | {} {}",
                self.row,
                self.figure,
                self.raw,
                self.ratio.as_deref().unwrap_or("-"),
                self.target,
                self.met_text()
            ),
        }
    }
}

/// The table, with a note saying on what it was measured.
#[derive(Debug, Clone)]
pub struct Table {
    pub machine: String,
    pub lines: Vec<Line>,
}

impl Table {
    pub fn new(machine: String) -> Table {
        Table {
            machine,
            lines: Vec::new(),
        }
    }
}

const HEADERS: [&str; 6] = [
    "row",
    "figure",
    "raw limit (same run)",
    "ratio",
    "target",
    "met",
];

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cells: Vec<[String; 6]> = self
            .lines
            .iter()
            .map(|l| {
                let figure = match &l.not_measured {
                    Some(why) => format!("not measured: {why}"),
                    None => l.figure.clone(),
                };
                [
                    l.row.clone(),
                    figure,
                    l.raw.clone(),
                    l.ratio.clone().unwrap_or_else(|| "-".into()),
                    l.target.clone(),
                    l.met_text().to_owned(),
                ]
            })
            .collect();
        let mut width = HEADERS.map(str::len);
        for row in &cells {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        writeln!(f, "{}", self.machine)?;
        let line = |f: &mut fmt::Formatter<'_>, cols: &[String]| -> fmt::Result {
            write!(f, "|")?;
            for (c, w) in cols.iter().zip(width) {
                write!(f, " {c}{} |", " ".repeat(w - c.chars().count()))?;
            }
            writeln!(f)
        };
        line(f, &HEADERS.map(str::to_owned))?;
        write!(f, "|")?;
        for w in width {
            write!(f, "{}|", "-".repeat(w + 2))?;
        }
        writeln!(f)?;
        for row in &cells {
            line(f, row)?;
        }
        Ok(())
    }
}

/// What the figures were measured on: CPUs, memory, kernel, time.
pub fn machine_note() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    format!(
        "flotilla-bench {} on {cpus} CPUs, {:.1} GiB RAM, load average {load} at start, {}",
        env!("CARGO_PKG_VERSION"),
        mem_kib as f64 / 1024.0 / 1024.0,
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}

/// `12,345`
pub fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Milliseconds with a precision that suits the size.
pub fn ms(d: std::time::Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 1000.0 {
        format!("{v:.0} ms")
    } else {
        format!("{:.2} s", v / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
    }

    #[test]
    fn a_row_that_could_not_be_measured_says_why_and_has_no_ratio() {
        let mut t = Table::new("m".into());
        t.lines.push(Line::not_measured("x", "no binary\nmore"));
        let s = t.to_string();
        assert!(s.contains("not measured: no binary"));
        assert!(!s.contains("more"));
    }
}
