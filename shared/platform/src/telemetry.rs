//! Logs and traces: `tracing` everywhere, OpenTelemetry over OTLP when an endpoint is set.
//!
//! W3C trace context is extracted from every inbound call (by the stack's trace layer) and
//! injected into every outbound call made through [`TraceContextInterceptor`], so one trace
//! follows a request across the fleet. Nothing here records request or response bodies:
//! secrets can only reach a span if a handler puts them there, and none does.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for production log pipelines.
    Json,
}

/// Flushes and shuts the trace exporter down when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _flushed = provider.force_flush();
            if let Err(err) = provider.shutdown() {
                eprintln!("penny: trace exporter shutdown failed: {err}");
            }
        }
    }
}

/// Installs the global subscriber. Call once per process, inside the tokio runtime (the
/// OTLP exporter needs it). Filter from `RUST_LOG`, default `info`. Traces go over OTLP/gRPC
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(format: LogFormat, service_name: &str) -> anyhow::Result<TelemetryGuard> {
    install_propagator();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));

    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => {
            Some(otlp_provider(&endpoint, service_name)?)
        }
        _ => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("penny")));
    let (text, json) = match format {
        LogFormat::Text => (
            Some(tracing_subscriber::fmt::layer().with_target(false)),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(text)
        .with(json)
        .try_init()?;
    if let Some(provider) = &provider {
        global::set_tracer_provider(provider.clone());
    }
    Ok(TelemetryGuard { provider })
}

fn otlp_provider(endpoint: &str, service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build())
}

/// Installs the W3C trace-context propagator (`traceparent`, `tracestate`) process-wide.
pub fn install_propagator() {
    global::set_text_map_propagator(TraceContextPropagator::new());
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context from inbound headers (`traceparent`, `tracestate`).
pub fn extract_context(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)))
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Client interceptor that propagates the current span's trace context to the callee.
#[derive(Debug, Clone, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let context = tracing::Span::current().context();
        global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut MetadataInjector(req.metadata_mut()));
        });
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    /// An inbound `traceparent` becomes the parent of the server's span, and an outbound call
    /// made inside that span carries the same trace id with the server span as its parent.
    #[test]
    fn w3c_trace_context_flows_from_inbound_to_outbound_calls() {
        install_propagator();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "traceparent",
                http::HeaderValue::from_static(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            );
            let span = tracing::info_span!("grpc");
            span.set_parent(extract_context(&headers))
                .expect("set parent");
            let _entered = span.enter();

            let outbound = TraceContextInterceptor
                .call(tonic::Request::new(()))
                .expect("interceptor");
            let traceparent = outbound
                .metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .expect("traceparent injected")
                .to_owned();
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert_eq!(parts.len(), 4, "{traceparent}");
            assert_eq!(parts[1], trace_id, "the trace continues");
            assert_ne!(
                parts[2], "00f067aa0ba902b7",
                "the caller's span is the parent, not the child"
            );
        });
    }
}
