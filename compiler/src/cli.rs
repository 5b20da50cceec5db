//! What the two binaries share about their command lines: clap's errors as one line.

use std::process::ExitCode;

use clap::Parser;

/// Parses the process's arguments. `--help` and `--version` print and exit 0; any other
/// error is one line on stderr (clap's message and tip without the usage block, or a JSON
/// document when `--json` is among the arguments) and exit 2, like every other bad input.
pub fn parse<T: Parser>(prog: &str) -> Result<T, ExitCode> {
    let e = match T::try_parse() {
        Ok(a) => return Ok(a),
        Err(e) => e,
    };
    if !e.use_stderr() {
        let _ = e.print();
        return Err(ExitCode::SUCCESS);
    }
    let msg = one_line(&e.render().to_string());
    if std::env::args().any(|a| a == "--json") {
        eprintln!("{}", serde_json::json!({ "error": msg, "exit_code": 2 }));
    } else {
        eprintln!("{prog}: error: {msg}");
    }
    Err(ExitCode::from(2))
}

/// clap's rendered error without its usage block and pointer to `--help`, lines joined.
fn one_line(text: &str) -> String {
    let body = text
        .split("\nUsage:")
        .next()
        .unwrap_or(text)
        .split("\nFor more information")
        .next()
        .unwrap_or(text);
    let parts: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = parts.join("; ").replace(":; ", ": ");
    let joined = joined.strip_prefix("error: ").unwrap_or(&joined);
    format!("{joined} (see --help)")
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_errors_become_one_line() {
        let text = "error: unexpected argument '--cpu' found\n\n  tip: to pass '--cpu' as a \
                    value, use '-- --cpu'\n\nUsage: diffdfq-compile <MODEL>\n\nFor more \
                    information, try '--help'.\n";
        assert_eq!(
            super::one_line(text),
            "unexpected argument '--cpu' found; tip: to pass '--cpu' as a value, use '-- --cpu' \
             (see --help)"
        );
        let text = "error: the following required arguments were not provided:\n  <MODEL>\n\n\
                    Usage: diffdfq-compile <MODEL>\n";
        assert_eq!(
            super::one_line(text),
            "the following required arguments were not provided: <MODEL> (see --help)"
        );
    }
}
