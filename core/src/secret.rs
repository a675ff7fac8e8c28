//! Keeping passwords out of sight: every broker URL Warren shows (log lines, errors, the
//! config's origin) goes through [`mask_url`] first.
//!
//! The masking works on the raw text, not on a parsed URL, so that a URL which fails to parse
//! (a `,` or an unencoded `@` in the password, a typo in the scheme) is masked too. It errs on
//! the side of hiding: everything between the username and the last `@` is replaced by `***`,
//! even when that was not all password.

/// What a password is replaced with.
pub const MASK: &str = "***";

/// Whether a log event may be written: Warren's binaries drop the rest whatever `RUST_LOG`
/// says. lapin's I/O loop logs every outgoing frame at trace level, the SASL
/// `connection.start-ok` with user and password (as bytes) included.
pub fn safe_to_log(target: &str, level: tracing::Level) -> bool {
    !(level == tracing::Level::TRACE && target.starts_with("lapin::io_loop"))
}

/// `url` with its password replaced by `***`: `amqp://guest:***@host:5672/%2f`. Works on any
/// text, including URLs that do not parse; text without a user part is returned unchanged.
pub fn mask_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The last `@` ends the user part: a password may hold an unencoded `@`, a host never does.
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.find(':') {
        Some(colon) => format!("{scheme}{}:{MASK}{host}", &userinfo[..colon]),
        // No `:`: a username alone, unless it holds characters a username would not (a password
        // given without one); hide it then.
        None if userinfo.contains(['/', '?', '#', ' ', ',']) => format!("{scheme}{MASK}{host}"),
        None => url.to_owned(),
    }
}

/// `text` (an error message that may quote `url`, or a part of it) with `url`'s password
/// hidden: the whole URL is replaced by its masked form, and any remaining occurrence of the
/// password, or of a tail of it of 4 characters or more (a parser quoting from the middle of
/// the URL), is replaced by `***`.
pub fn mask_in(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &mask_url(url));
    if let Some(password) = password_of(url) {
        let chars: Vec<(usize, char)> = password.char_indices().collect();
        for &(start, _) in &chars {
            let tail = &password[start..];
            if tail.chars().count() < 4 && start > 0 {
                break;
            }
            if !tail.is_empty() && out.contains(tail) {
                out = out.replace(tail, MASK);
            }
        }
    }
    out
}

/// `text` with every URL in it (a run of characters around `://`, up to whitespace or a quote)
/// masked by [`mask_url`]: for messages that may quote a config file's lines, such as TOML
/// parse errors.
pub fn mask_urls_in(text: &str) -> String {
    let boundary = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '[' | ']' | '=');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = rest[..i].rfind(boundary).map_or(0, |b| b + 1);
        // A quoted URL runs to its closing quote (a password may hold a space); else to the
        // next boundary.
        let quote = rest[..start]
            .chars()
            .next_back()
            .filter(|c| matches!(c, '"' | '\'' | '`'));
        let end = match quote {
            Some(q) => rest[i..].find([q, '\n']),
            None => rest[i..].find(boundary),
        }
        .map_or(rest.len(), |e| i + e);
        out.push_str(&rest[..start]);
        out.push_str(&mask_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The raw password part of `url` (between the first `:` after the scheme and the last `@`).
fn password_of(url: &str) -> Option<&str> {
    let rest = url.find("://").map_or(url, |i| &url[i + 3..]);
    let at = rest.rfind('@')?;
    let userinfo = &rest[..at];
    let colon = userinfo.find(':')?;
    Some(&userinfo[colon + 1..]).filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_url_keeps_everything_but_the_password() {
        assert_eq!(
            mask_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_url("amqps://warren:s3cr3t@rabbit.example.com/prod?heartbeat=10"),
            "amqps://warren:***@rabbit.example.com/prod?heartbeat=10"
        );
    }

    #[test]
    fn urls_without_a_password_are_unchanged() {
        for url in [
            "amqp://127.0.0.1:5672/%2f",
            "amqp://user@host/%2f",
            "amqps://host",
        ] {
            assert_eq!(mask_url(url), url);
        }
    }

    #[test]
    fn passwords_that_break_parsing_are_masked_too() {
        let nasty = "amqp://warren:p,a@s%s:w/rd@127.0.0.1:5672/%2f";
        let shown = mask_url(nasty);
        assert_eq!(shown, "amqp://warren:***@127.0.0.1:5672/%2f");
        for part in ["p,a", "s%s", "w/rd", "rd@"] {
            assert!(!shown.contains(part), "{shown}");
        }
        // Not even a scheme.
        assert_eq!(mask_url("guest:hunter2@host"), "guest:***@host");
        // A password with no username.
        assert_eq!(mask_url("amqp://:hunter2@host"), "amqp://:***@host");
    }

    #[test]
    fn lapin_frames_are_never_logged() {
        assert!(!safe_to_log("lapin::io_loop", tracing::Level::TRACE));
        assert!(safe_to_log("lapin::io_loop", tracing::Level::DEBUG));
        assert!(safe_to_log("lapin::channel", tracing::Level::TRACE));
        assert!(safe_to_log("warren_workers::worker", tracing::Level::TRACE));
    }

    #[test]
    fn every_url_in_a_text_is_masked() {
        let text = "TOML parse error at line 2\n  |\n2 | url = \"amqp://u:pa ss@h/\" x\n\
                    failover_urls = ['amqps://v:w0rd@h2/%2f']";
        let shown = mask_urls_in(text);
        assert!(!shown.contains("w0rd"), "{shown}");
        assert!(shown.contains("'amqps://v:***@h2/%2f'"), "{shown}");
        assert!(shown.contains("TOML parse error at line 2"), "{shown}");
        // A quoted URL runs to its quote, so a password with a space is masked whole.
        assert!(shown.contains("\"amqp://u:***@h/\" x"), "{shown}");
        assert_eq!(mask_urls_in("no url here"), "no url here");
    }

    #[test]
    fn messages_quoting_the_url_or_a_piece_of_it_are_masked() {
        let url = "amqp://guest:s3cr3t,more@127.0.0.1/%2f";
        let message = format!("Invalid URL: '{url}'");
        let shown = mask_in(&message, url);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("amqp://guest:***@127.0.0.1/%2f"), "{shown}");
        // A parser that quoted only the part after the comma.
        let shown = mask_in("Invalid URL: 'more@127.0.0.1/%2f'", url);
        assert!(!shown.contains("more@"), "{shown}");
        let shown = mask_in("cannot parse 'cr3t,more@127.0.0.1'", url);
        assert!(!shown.contains("cr3t"), "{shown}");
        // Text that does not quote it stays as it was.
        assert_eq!(mask_in("invalid port number", url), "invalid port number");
    }
}
