//! How the `warren` command prints: escaping untrusted text, colour only on a terminal (and
//! never with `NO_COLOR`), progress bars only on a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether standard error gets colour: a terminal, and `NO_COLOR` unset or empty
/// (<https://no-color.org>).
pub fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && !no_color()
}

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// A progress bar counting `what` on a terminal; nothing when stderr is piped.
pub fn progress_bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let template = format!("{{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// `text` with every control character (C0, DEL, C1) and bidirectional-text control written
/// as a Rust escape (`\u{1b}`), so untrusted text prints as what it is.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn untrusted_text_prints_without_control_characters() {
        let hostile = "job\u{1b}[2J\u{1b}]0;owned\u{7}\r\nline\u{9b}31m\u{202e}txt.exe";
        let shown = printable(hostile);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert!(shown.contains("\\u{1b}[2J"));
        assert!(shown.contains("\\u{202e}"));
        assert_eq!(printable("plain {\"é\": 1}"), "plain {\"é\": 1}");
    }
}
