//! `Clear-Site-Data` on logout (`headers.clear_site_data`): when a logout view answers with success, the
//! browser drops this site's cookies, storage and cache (W3C Clear Site Data), so nothing of the session
//! outlives it on a shared computer. `"cookies"` clears every cookie of the registrable domain, sibling
//! subdomains' included: the README says so.

use http::header::HeaderName;
use http::{Request, Response};

use super::RequestGuard;
use crate::body::ProxyBody;
use crate::config::ClearSiteData;
use crate::route_path::route_path;

static CLEAR_SITE_DATA: HeaderName = HeaderName::from_static("clear-site-data");

pub struct ClearSiteDataOnLogout {
    config: Option<ClearSiteData>,
}

impl ClearSiteDataOnLogout {
    pub fn new(config: Option<ClearSiteData>) -> Self {
        ClearSiteDataOnLogout { config }
    }
}

impl RequestGuard for ClearSiteDataOnLogout {
    /// Whether the request was for a logout path.
    type Note = bool;

    fn before<B>(&self, req: &mut Request<B>) -> Result<bool, Box<Response<ProxyBody>>> {
        let Some(config) = &self.config else {
            return Ok(false);
        };
        let path = route_path(req.uri().path());
        Ok(config.paths.iter().any(|p| path.starts_with(p.as_str())))
    }

    fn after(&self, logout: bool, response: &mut Response<ProxyBody>) {
        let status = response.status();
        if let Some(config) = &self.config
            && logout
            && (status.is_success() || status.is_redirection())
        {
            response
                .headers_mut()
                .insert(CLEAR_SITE_DATA.clone(), config.value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{HeaderValue, StatusCode};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::middleware::guard_layer;

    #[tokio::test]
    async fn only_a_successful_logout_clears_the_site() {
        let config = ClearSiteData {
            paths: vec!["/admin/logout/".into()],
            value: HeaderValue::from_static("\"cache\", \"cookies\", \"storage\""),
        };
        let service = ServiceBuilder::new()
            .layer(guard_layer(ClearSiteDataOnLogout::new(Some(config))))
            .service(service_fn(|req: Request<()>| async move {
                let mut response = Response::new(ProxyBody::empty());
                if req.uri().query() == Some("fail") {
                    *response.status_mut() = StatusCode::FORBIDDEN;
                } else {
                    *response.status_mut() = StatusCode::FOUND;
                }
                Ok::<_, Infallible>(response)
            }));
        let cleared = |uri: &'static str| {
            let service = service.clone();
            async move {
                let req = Request::builder().uri(uri).body(()).expect("request");
                let Ok(response) = service.oneshot(req).await;
                response.headers().get("clear-site-data").cloned()
            }
        };
        assert_eq!(
            cleared("/admin/logout/").await.expect("cleared"),
            "\"cache\", \"cookies\", \"storage\""
        );
        assert!(
            cleared("/admin/%6Cogout/").await.is_some(),
            "every spelling"
        );
        assert!(
            cleared("/admin/logout/?fail").await.is_none(),
            "a refused logout"
        );
        assert!(cleared("/admin/").await.is_none());
    }
}
