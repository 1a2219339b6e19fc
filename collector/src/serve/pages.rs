//! The dashboard over HTTP: `/` (the fleet grid), `/site` (a site's page), `/login`,
//! `/logout` and `/dash.css` ([`crate::page`] renders them).
//!
//! A browser signs in with a reader token through the login form and gets a session
//! cookie (`HttpOnly`, `Secure`, `SameSite=Strict`, 12 hours), kept in memory (a restart
//! signs everyone out). The session reads what the reader's token reads, the JSON
//! endpoints included; with `--open-read` no sign-in is asked. Without either, a page
//! request is sent to the login form, never given data.
//!
//! Every page is sent with a Content-Security-Policy that allows no script, no frame and
//! no resource from elsewhere, and with `nosniff`, `no-referrer` and `no-store`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::pool::{Outcome, QueryRefusal};
use super::{AppState, Role, now_ns};
use crate::page::{self, SiteQuery};

/// The session cookie's name.
pub const COOKIE: &str = "pathprobe_session";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_hours(12);
/// Most sessions held at once; past it the oldest is dropped.
const MAX_SESSIONS: usize = 10_000;

/// What a page may load: its own stylesheet, nothing else, and no script at all.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The signed-in browsers: a session id's digest, its reader and when it ends.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<[u8; 32], (String, Instant)>>);

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// A new session of `reader`: its id, for the cookie.
    pub fn open(&self, reader: &str) -> crate::Result<String> {
        let (id, _) = super::new_token()?;
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, (_, until)| *until > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(digest(&id), (reader.to_string(), now + SESSION_TTL));
        Ok(id)
    }

    /// The reader of a live session.
    pub fn reader(&self, id: &str) -> Option<String> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&digest(id))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(r, _)| r.clone())
    }

    pub fn close(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&digest(id));
    }
}

/// The session id in a request's cookies.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The headers every page carries.
async fn page_headers(req: axum::extract::Request, next: middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Pages: a reader (session, token or `--open-read`) first; anyone else goes to the
/// login form.
async fn readers_only(
    State(st): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if st.authorize_read(req.headers()).is_err() {
        return Redirect::to("/login").into_response();
    }
    next.run(req).await
}

/// The dashboard's routes.
pub(super) fn routes(st: &Arc<AppState>) -> axum::Router<Arc<AppState>> {
    let data = axum::Router::new()
        .route("/", axum::routing::get(grid))
        .route("/site", axum::routing::get(site))
        .layer(middleware::from_fn_with_state(Arc::clone(st), readers_only));
    axum::Router::new()
        .route("/login", axum::routing::get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/dash.css", axum::routing::get(css))
        .merge(data)
        .layer(middleware::from_fn(page_headers))
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        page::CSS,
    )
        .into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (status, Html(body)).into_response()
}

/// An error page: what went wrong, as text.
fn error_page(status: StatusCode, message: &str) -> Response {
    let body = maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "pathprobe" } link rel="stylesheet" href="/dash.css"; }
            body { main {
                h1 { "Cannot show this page" }
                p.error role="alert" { (message) }
                p { a href="/" { "Back to the fleet" } }
            } }
        }
    };
    html(status, body.into_string())
}

/// Renders a page on a query thread, within the query limits.
async fn render(
    st: &AppState,
    work: impl FnOnce() -> crate::Result<String> + Send + 'static,
) -> Response {
    let limits = st.queries.limits;
    match st.queries.run(work).await {
        Outcome::Done(Ok(body)) => html(StatusCode::OK, body),
        Outcome::Done(Err(crate::Error::Config(e))) => error_page(StatusCode::BAD_REQUEST, &e),
        Outcome::Done(Err(e)) => error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        Outcome::Busy => error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "{} queries are being answered already (--max-concurrent-queries): reload in a few seconds",
                limits.max_concurrent
            ),
        ),
        Outcome::TimedOut => error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the page was not ready within {} (--query-timeout): pick a shorter range",
                humantime::format_duration(limits.timeout)
            ),
        ),
    }
}

/// The range of a page, checked against `--max-query-range`.
#[allow(clippy::result_large_err, reason = "the refusal is the page itself")]
fn range(
    st: &AppState,
    since: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(u64, u64), Response> {
    let (f, t) = crate::time_range(since, from, to, now_ns())
        .map_err(|e| error_page(StatusCode::BAD_REQUEST, &e))?;
    let max = st.queries.limits.max_range;
    if Duration::from_nanos(t.saturating_sub(f)) > max {
        st.queries.count(QueryRefusal::Range);
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            &format!(
                "the range is longer than {} (--max-query-range): pick a shorter one",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok((f, t))
}

#[derive(Debug, Deserialize)]
pub(super) struct GridQuery {
    since: Option<String>,
}

async fn grid(State(st): State<Arc<AppState>>, Query(q): Query<GridQuery>) -> Response {
    let since = q.since.unwrap_or_else(|| "15m".to_string());
    let (from, to) = match range(&st, Some(&since), None, None) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let (store, rule) = (Arc::clone(&st.store), st.grid.clone());
    render(&st, move || {
        let g = crate::dash::grid(&*store, from, to, now_ns(), &rule)?;
        Ok(page::grid(&g, &since))
    })
    .await
}

async fn site(State(st): State<Arc<AppState>>, Query(mut q): Query<SiteQuery>) -> Response {
    if q.site.is_empty() {
        return Redirect::to("/").into_response();
    }
    if q.since.is_none() && q.from.is_none() {
        q.since = Some("1h".to_string());
    }
    let (from, to) = match range(&st, q.since.as_deref(), q.from.as_deref(), q.to.as_deref()) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let store = Arc::clone(&st.store);
    render(&st, move || {
        let data = page::site_data(&*store, &q, from, to)?;
        page::site(&data)
    })
    .await
}

async fn login_form(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if st.authorize_read(&headers).is_ok() {
        return Redirect::to("/").into_response();
    }
    let message = (!st.tokens.as_ref().is_some_and(super::Tokens::has_readers)).then_some(
        "This collector has no reader tokens: add a `reader NAME TOKEN` line to its --tokens file (`pathprobe-collector token new --reader NAME`), or start it with --open-read on loopback.",
    );
    html(StatusCode::OK, page::login(message))
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    /// Absent from a hand-made request: refused as an unknown token, on the form.
    #[serde(default)]
    token: String,
}

async fn login(State(st): State<Arc<AppState>>, Form(f): Form<LoginForm>) -> Response {
    let role = st.tokens.as_ref().and_then(|t| t.role_of(f.token.trim()));
    let reader = match role {
        Some(Role::Reader(name)) => name.clone(),
        Some(Role::Agent(id)) => {
            return html(
                StatusCode::FORBIDDEN,
                page::login(Some(&format!(
                    "That is agent `{id}`'s token, which sends reports but does not read: sign in with a reader token."
                ))),
            );
        }
        None => {
            return html(
                StatusCode::UNAUTHORIZED,
                page::login(Some(
                    "Unknown token: give a reader token of the collector's tokens file.",
                )),
            );
        }
    };
    match st.sessions.open(&reader) {
        Ok(id) => {
            tracing::info!(reader = %reader, "dashboard sign-in");
            let cookie = format!(
                "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            let mut resp = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn logout(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        st.sessions.close(id);
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "pathprobe_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_check_and_close() {
        let s = Sessions::default();
        let id = s.open("noc").unwrap();
        assert_eq!(s.reader(&id).as_deref(), Some("noc"));
        assert_eq!(s.reader("not-a-session"), None);
        s.close(&id);
        assert_eq!(s.reader(&id), None);
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; pathprobe_session=abc; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("pathprobe_sessionx=abc"),
        );
        assert_eq!(session_cookie(&h), None);
    }
}
