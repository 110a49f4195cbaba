//! Problems found while loading a configuration file.

use std::fmt;

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Field path such as `apis[0].subscription.header_names[1]`; empty for
    /// problems with the file as a whole.
    pub path: String,
    /// 1-based source line, when known.
    pub line: Option<usize>,
    /// What is wrong. Never contains a secret value.
    pub message: String,
}

impl Problem {
    /// Formats the problem as one line, prefixed by the source name.
    pub fn display_in(&self, source_name: &str) -> String {
        let mut out = String::from(source_name);
        if let Some(line) = self.line {
            out.push(':');
            out.push_str(&line.to_string());
        }
        out.push_str(": ");
        if !self.path.is_empty() {
            out.push_str(&self.path);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }
}

/// Every problem found in one configuration file.
///
/// `Display` prints one problem per line, e.g.
/// `gateway.yaml:12: apis[0].backends[1]: unknown backend 'x'`.
#[derive(Debug)]
pub struct ConfigErrors {
    /// The file name (or other label) given to the loader.
    pub source_name: String,
    /// The problems, in source order where lines are known.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&problem.display_in(&self.source_name))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_line() {
        let errors = ConfigErrors {
            source_name: "gateway.yaml".into(),
            problems: vec![
                Problem {
                    path: "apis[0].backends[1]".into(),
                    line: Some(12),
                    message: "unknown backend 'x'".into(),
                },
                Problem {
                    path: "backends".into(),
                    line: None,
                    message: "is required".into(),
                },
                Problem {
                    path: String::new(),
                    line: Some(3),
                    message: "bad yaml".into(),
                },
            ],
        };
        assert_eq!(
            errors.to_string(),
            "gateway.yaml:12: apis[0].backends[1]: unknown backend 'x'\n\
             gateway.yaml: backends: is required\n\
             gateway.yaml:3: bad yaml"
        );
    }
}
