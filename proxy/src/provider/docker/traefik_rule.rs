//! The subset of Traefik's router rule language that picks hosts and paths:
//! `Host(...)`, `HostRegexp(...)`, `PathPrefix(...)` (and `Path(...)`), joined by `&&`, `||`
//! and parentheses, as in `Host(`a.com`) || Host(`b.com`) && PathPrefix(`/api`)`.
//!
//! A rule becomes a list of alternatives (its disjunctive normal form), each a set of host
//! patterns and a path prefix. Anything else (`!`, `Header(...)`, two `Host` in one
//! alternative) is an error that names the problem, so the container is skipped with a
//! warning instead of being routed wrongly.

use crate::state::{HostError, HostPattern};

/// Why a rule is refused; each names the problem (and where, when it can).
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("expected `{0}{0}` at position {1}")]
    Doubled(char, usize),
    #[error("negation (`!`) is not supported")]
    Negation,
    #[error("expected `(` after `{0}`")]
    NoParenthesis(String),
    #[error("unterminated string in `{0}(...)`")]
    Unterminated(String),
    #[error("unexpected `{0}` at position {1} in `{2}(...)`: quote arguments with backticks")]
    Unquoted(char, usize, String),
    #[error("`{0}(` is not closed")]
    CallNotClosed(String),
    #[error("unexpected `{0}` at position {1}")]
    Unexpected(char, usize),
    #[error("the rule ends too early")]
    EndsEarly,
    #[error("a `(` is not closed")]
    NotClosed,
    #[error("`&&` or `||` without a matcher before it")]
    DanglingOperator,
    #[error("unexpected `)`")]
    UnexpectedClose,
    #[error("two host matchers joined by `&&` are not supported")]
    TwoHosts,
    #[error("two path matchers joined by `&&` are not supported")]
    TwoPaths,
    #[error("`{0}()` needs an argument")]
    NoArgument(String),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("`{0}` with several paths is not supported; use `||`")]
    SeveralPaths(String),
    #[error("path `{0}` must start with `/`")]
    Path(String),
    #[error("`{0}(...)` is not supported (only Host, HostRegexp, PathPrefix and Path)")]
    Unsupported(String),
    #[error("unexpected text after the end of the rule")]
    Trailing,
}

/// One way the rule can match: any of `hosts` (none: any host) with `path` as the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alternative {
    pub hosts: Vec<HostPattern>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Func(String, Vec<String>),
    And,
    Or,
    Open,
    Close,
}

fn tokenize(rule: &str) -> Result<Vec<Token>, RuleError> {
    let mut tokens = Vec::new();
    let mut chars = rule.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        match c {
            ' ' | '\t' | '\n' => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '&' | '|' => {
                chars.next();
                if chars.next().map(|(_, d)| d) != Some(c) {
                    return Err(RuleError::Doubled(c, i));
                }
                tokens.push(if c == '&' { Token::And } else { Token::Or });
            }
            '!' => return Err(RuleError::Negation),
            c if c.is_ascii_alphabetic() => {
                let mut name = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_ascii_alphanumeric() {
                        name.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                while chars.peek().is_some_and(|&(_, c)| c == ' ') {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('(') {
                    return Err(RuleError::NoParenthesis(name));
                }
                let mut args = Vec::new();
                loop {
                    match chars.next() {
                        Some((_, ' ' | ',')) => {}
                        Some((_, ')')) => break,
                        Some((_, q @ ('`' | '"' | '\''))) => {
                            let mut arg = String::new();
                            loop {
                                match chars.next() {
                                    Some((_, c)) if c == q => break,
                                    Some((_, c)) => arg.push(c),
                                    None => return Err(RuleError::Unterminated(name)),
                                }
                            }
                            args.push(arg);
                        }
                        Some((j, c)) => return Err(RuleError::Unquoted(c, j, name)),
                        None => return Err(RuleError::CallNotClosed(name)),
                    }
                }
                tokens.push(Token::Func(name, args));
            }
            _ => return Err(RuleError::Unexpected(c, i)),
        }
    }
    Ok(tokens)
}

/// Recursive descent: `or := and ('||' and)*`, `and := atom ('&&' atom)*`,
/// `atom := Func | '(' or ')'`. Each level returns alternatives (DNF).
struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn or(&mut self) -> Result<Vec<Alternative>, RuleError> {
        let mut alts = self.and()?;
        while self.tokens.get(self.pos) == Some(&Token::Or) {
            self.pos += 1;
            alts.extend(self.and()?);
        }
        Ok(alts)
    }

    fn and(&mut self) -> Result<Vec<Alternative>, RuleError> {
        let mut alts = self.atom()?;
        while self.tokens.get(self.pos) == Some(&Token::And) {
            self.pos += 1;
            let right = self.atom()?;
            let mut product = Vec::new();
            for a in &alts {
                for b in &right {
                    product.push(conjoin(a, b)?);
                }
            }
            alts = product;
        }
        Ok(alts)
    }

    fn atom(&mut self) -> Result<Vec<Alternative>, RuleError> {
        let token = self.tokens.get(self.pos).cloned().ok_or(RuleError::EndsEarly)?;
        self.pos += 1;
        match token {
            Token::Open => {
                let alts = self.or()?;
                if self.tokens.get(self.pos) != Some(&Token::Close) {
                    return Err(RuleError::NotClosed);
                }
                self.pos += 1;
                Ok(alts)
            }
            Token::Func(name, args) => matcher(&name, &args).map(|a| vec![a]),
            Token::And | Token::Or => Err(RuleError::DanglingOperator),
            Token::Close => Err(RuleError::UnexpectedClose),
        }
    }
}

fn conjoin(a: &Alternative, b: &Alternative) -> Result<Alternative, RuleError> {
    if !a.hosts.is_empty() && !b.hosts.is_empty() {
        return Err(RuleError::TwoHosts);
    }
    if a.path.is_some() && b.path.is_some() {
        return Err(RuleError::TwoPaths);
    }
    Ok(Alternative {
        hosts: if a.hosts.is_empty() { b.hosts.clone() } else { a.hosts.clone() },
        path: a.path.clone().or_else(|| b.path.clone()),
    })
}

fn matcher(name: &str, args: &[String]) -> Result<Alternative, RuleError> {
    if args.is_empty() {
        return Err(RuleError::NoArgument(name.to_owned()));
    }
    match name {
        "Host" => Ok(Alternative {
            hosts: args.iter().map(|h| HostPattern::parse(h)).collect::<Result<_, _>>()?,
            path: None,
        }),
        "HostRegexp" => Ok(Alternative {
            hosts: args.iter().map(|h| HostPattern::regex(&traefik_v2_regex(h))).collect::<Result<_, _>>()?,
            path: None,
        }),
        "PathPrefix" | "Path" => {
            if args.len() != 1 {
                return Err(RuleError::SeveralPaths(name.to_owned()));
            }
            if !args[0].starts_with('/') {
                return Err(RuleError::Path(args[0].clone()));
            }
            Ok(Alternative { hosts: Vec::new(), path: Some(args[0].clone()) })
        }
        other => Err(RuleError::Unsupported(other.to_owned())),
    }
}

/// Traefik v2 writes `{name:regex}` placeholders (`{sub:[a-z]+}.example.com`), matched
/// against the whole host; v3 takes a plain regex, searched. Placeholders become groups, a v2
/// pattern's dots become literal, and it is anchored at both ends.
fn traefik_v2_regex(pattern: &str) -> String {
    if !pattern.contains('{') {
        return pattern.to_owned();
    }
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&regex::escape(&rest[..start]));
        let Some(end) = rest[start..].find('}') else { break };
        let inner = &rest[start + 1..start + end];
        let re = inner.split_once(':').map_or("[^.]+", |(_, re)| re);
        out.push_str("(?:");
        out.push_str(re);
        out.push(')');
        rest = &rest[start + end + 1..];
    }
    out.push_str(&regex::escape(rest));
    format!("^(?:{out})$")
}

/// Parses a rule into its alternatives.
pub fn parse(rule: &str) -> Result<Vec<Alternative>, RuleError> {
    let mut parser = Parser { tokens: tokenize(rule)?, pos: 0 };
    let alts = parser.or()?;
    if parser.pos != parser.tokens.len() {
        return Err(RuleError::Trailing);
    }
    Ok(alts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HostPattern {
        HostPattern::parse(h).unwrap()
    }

    #[test]
    fn common_rules() {
        assert_eq!(
            parse("Host(`a.com`)").unwrap(),
            vec![Alternative { hosts: vec![host("a.com")], path: None }]
        );
        assert_eq!(
            parse("Host(`a.com`, `b.com`) && PathPrefix(`/api`)").unwrap(),
            vec![Alternative { hosts: vec![host("a.com"), host("b.com")], path: Some("/api".into()) }]
        );
        assert_eq!(
            parse("Host(`a.com`) || Host(`b.com`) && PathPrefix(`/x`)").unwrap(),
            vec![
                Alternative { hosts: vec![host("a.com")], path: None },
                Alternative { hosts: vec![host("b.com")], path: Some("/x".into()) },
            ]
        );
        assert_eq!(
            parse("(Host(`a.com`) || Host(`b.com`)) && PathPrefix(`/x`)").unwrap(),
            vec![
                Alternative { hosts: vec![host("a.com")], path: Some("/x".into()) },
                Alternative { hosts: vec![host("b.com")], path: Some("/x".into()) },
            ]
        );
    }

    #[test]
    fn host_regexp_v2_and_v3() {
        let v2 = parse("HostRegexp(`{sub:[a-z]+}.example.com`)").unwrap();
        let HostPattern::Regex(re) = &v2[0].hosts[0] else { panic!() };
        let re = regex::Regex::new(re).unwrap();
        assert!(
            re.is_match("abc.example.com")
                && !re.is_match("abc.examplexcom")
                && !re.is_match("a1.example.com")
        );
        let v3 = parse("HostRegexp(`^[a-z]+\\.example\\.com$`)").unwrap();
        assert!(matches!(&v3[0].hosts[0], HostPattern::Regex(_)));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (rule, needle) in [
            ("Host(`a.com`", "not closed"),
            ("Host(a.com)", "backticks"),
            ("!Host(`a.com`)", "negation"),
            ("Header(`X`, `y`)", "not supported"),
            ("Host(`a.com`) && Host(`b.com`)", "two host"),
            ("Host(`a.com`) &", "`&&`"),
            ("PathPrefix(`api`)", "must start with"),
            ("Host(`bad host`)", "not a valid host"),
            ("", "ends too early"),
        ] {
            let err = parse(rule).unwrap_err().to_string();
            assert!(err.contains(needle), "{rule:?}: {err}");
        }
    }

    #[test]
    fn fuzzed_rules_are_parsed_or_refused_never_a_crash() {
        let pieces = [
            "Host(",
            "HostRegexp(",
            "PathPrefix(",
            "Path(",
            "Header(",
            ")",
            "(",
            "`a.example.com`",
            "`{sub:[a-z]+}.b.test`",
            "`/api`",
            "`*.c.test`",
            ",",
            " ",
            "&&",
            "||",
            "!",
            "\"",
            "'",
            "`",
            "&",
            "|",
        ];
        crate::fuzz::run(
            "traefik rule",
            |rng| crate::fuzz::text(rng, &pieces, 12),
            |rule| {
                if let Ok(alternatives) = parse(rule) {
                    for a in alternatives {
                        assert!(a.path.as_deref().is_none_or(|p| p.starts_with('/')), "{a:?}");
                    }
                }
            },
        );
    }
}
