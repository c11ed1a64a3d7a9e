//! The admin API over HTTP(S): one request per command, the token on
//! mutations, and the API's JSON errors (`{"error", "detail"}`) turned into
//! one readable line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// TLS towards an `https://` admin endpoint.
pub struct Tls {
    /// CA to trust (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// One replica's admin API.
pub struct Admin {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// The admin token from `file` or, without one, the `LB_ADMIN_TOKEN` value.
pub fn token(file: Option<&Path>, env_value: Option<String>) -> anyhow::Result<Option<String>> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?;
            Ok(Some(text.trim().to_string()))
        }
        None => Ok(env_value
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())),
    }
}

/// `text` as one path segment (`/` and the like escaped).
pub fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Admin {
    /// A client of the admin endpoint at `base` (`http://host:port` or
    /// `https://…`).
    pub fn new(
        base: &str,
        token: Option<String>,
        tls: &Tls,
        timeout: Duration,
    ) -> anyhow::Result<Admin> {
        let base = base.trim_end_matches('/').to_string();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "--admin {base:?} must start with http:// or https://"
        );
        let mut builder = reqwest::Client::builder().timeout(timeout).no_proxy();
        if base.starts_with("https://") {
            let ca = tls.ca.as_deref().context(
                "an https:// admin endpoint needs --ca (the CA that signed its certificate)",
            )?;
            let identity = tls
                .identity
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            let config = lb_server::internals::http_client_config(
                ["--ca", "--cert", "--key"],
                ca,
                identity,
            )?;
            builder = builder.use_preconfigured_tls(config);
        }
        Ok(Admin {
            base,
            token,
            http: builder.build()?,
        })
    }

    /// `GET path`, its JSON answer.
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.answer(self.http.get(self.url(path))).await
    }

    /// A mutation (`POST`, `PUT`, `DELETE`) with the token and an optional
    /// JSON body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let token = self.token.as_deref().context(
            "this command changes the LB: give the admin token with --token-file or LB_ADMIN_TOKEN",
        )?;
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut request = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.answer(request).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn answer(&self, request: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the admin endpoint {}", self.base))?;
        let status = response.status();
        let text = response.text().await?;
        let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            let why = json
                .as_ref()
                .map(|v| {
                    format!(
                        "{}: {}",
                        v["error"].as_str().unwrap_or("error"),
                        v["detail"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_else(|| text.trim().to_string());
            anyhow::bail!("{} {why}", status.as_u16());
        }
        json.with_context(|| format!("the admin endpoint answered {status} with no JSON: {text}"))
    }
}
