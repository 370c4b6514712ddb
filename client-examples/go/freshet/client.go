// Package freshet is a small client of Freshet's FeatureService on top of
// the stubs that client-examples/setup.sh generates from proto/ into gen/.
//
// What it shows:
//   - one *grpc.ClientConn per process, shared by every goroutine (it is a
//     pool of HTTP/2 connections; dialing per request costs a handshake each
//     time);
//   - retries with exponential backoff for UNAVAILABLE and
//     RESOURCE_EXHAUSTED, done by gRPC itself from the service config
//     (retryPolicy), throttled so a struggling server is not hammered;
//   - a deadline on every call (context.WithTimeout; it covers all retry
//     attempts together);
//   - the bearer token as per-RPC credentials ("authorization: Bearer ...");
//   - statuses and event times read from every value, never just the value.
package freshet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	freshetv1 "freshetclient/gen/freshet/v1"
)

// ServiceConfig is gRPC's service config for the FeatureService
// (https://github.com/grpc/grpc/blob/master/doc/service_config.md):
//   - retryPolicy: up to 4 attempts, backoff 50 ms, 100 ms, 200 ms (gRPC
//     picks a random wait up to each), for UNAVAILABLE (server down,
//     restarting, connection lost) and RESOURCE_EXHAUSTED (Freshet sheds calls
//     over its in-flight limit at once: a short wait usually gets through).
//     Other codes are final: INVALID_ARGUMENT is a bug in the request,
//     DEADLINE_EXCEEDED means the time budget is spent, UNAUTHENTICATED needs
//     another token.
//   - retryThrottling: each failure costs a token, each success gives 0.1
//     back; below half of maxTokens retries stop, so a fleet of clients does
//     not multiply the load of a server that is already shedding.
const ServiceConfig = `{
  "methodConfig": [{
    "name": [{"service": "freshet.v1.FeatureService"}],
    "retryPolicy": {
      "maxAttempts": 4,
      "initialBackoff": "0.05s",
      "maxBackoff": "0.5s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    }
  }],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}`

// bearer sends "authorization: Bearer <token>" with every call.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false only for plaintext connections, which
// the caller asked for explicitly (inside a trusted network): gRPC refuses
// to send such credentials in clear otherwise.
func (b bearer) RequireTransportSecurity() bool { return b.secure }

// Options of Dial.
type Options struct {
	Token string
	// TLSCA is a PEM file of the CA that signed the server's certificate:
	// connect with TLS. Empty: plaintext.
	TLSCA string
}

// Dial makes the process's one connection to freshet-server at address
// (host:port). It does not block: connecting happens on the first call.
func Dial(address string, o Options) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithDefaultServiceConfig(ServiceConfig),
		// Keep the connection warm and notice a dead peer between requests.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 5 * time.Second}),
	}
	secure := o.TLSCA != ""
	if secure {
		pem, err := os.ReadFile(o.TLSCA)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", o.TLSCA)
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if o.Token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer{token: o.Token, secure: secure}))
	}
	return grpc.NewClient(address, opts...)
}

// Feature is one value of one entity, with what the server says about it.
type Feature struct {
	Status FeatureStatus
	// Value is int64, float64, string, bool, time.Time, or nil (not
	// PRESENT, or an explicit null).
	Value any
	// EventTime is the time of the newest event the value reflects; zero
	// for NOT_FOUND.
	EventTime time.Time
}

// FeatureStatus is the status of a value: PRESENT, NULL_VALUE, NOT_FOUND or
// OUTSIDE_MAX_AGE.
type FeatureStatus = freshetv1.FeatureStatus

// Present is whether the value can be used.
func (f Feature) Present() bool { return f.Status == freshetv1.FeatureStatus_PRESENT }

func value(v *freshetv1.Value) any {
	switch k := v.GetKind().(type) {
	case *freshetv1.Value_Int64Value:
		return k.Int64Value
	case *freshetv1.Value_DoubleValue:
		return k.DoubleValue
	case *freshetv1.Value_StringValue:
		return k.StringValue
	case *freshetv1.Value_BoolValue:
		return k.BoolValue
	case *freshetv1.Value_TimestampValue:
		return k.TimestampValue.AsTime()
	default: // unset, or NullValue
		return nil
	}
}

// Decode turns a GetFeaturesResponse into one map per requested entity, in
// request order, keyed by feature reference ("view:feature").
func Decode(r *freshetv1.GetFeaturesResponse) []map[string]Feature {
	rows := make([]map[string]Feature, 0, len(r.GetResults()))
	for _, row := range r.GetResults() {
		m := make(map[string]Feature, len(r.GetFeatureNames()))
		for i, name := range r.GetFeatureNames() {
			fv := row.GetValues()[i]
			f := Feature{Status: fv.GetStatus(), Value: value(fv.GetValue())}
			if fv.GetEventTime() != nil {
				f.EventTime = fv.GetEventTime().AsTime()
			}
			m[name] = f
		}
		rows = append(rows, m)
	}
	return rows
}

// ViewFreshness is what GetFreshness says of one view.
type ViewFreshness struct {
	View    string
	Verdict freshetv1.FreshnessVerdict
	Age     time.Duration
	Budget  time.Duration
}

// Trusted is whether the view's values are good enough to act on: caught
// up, or behind with its newest applied event still within its budget.
func (v ViewFreshness) Trusted() bool {
	return v.Verdict == freshetv1.FreshnessVerdict_FRESH || v.Verdict == freshetv1.FreshnessVerdict_LAGGING
}

// Client wraps the generated stub with a deadline per call and a cached
// freshness report. Safe for concurrent use; make one per process.
type Client struct {
	Stub     freshetv1.FeatureServiceClient
	Deadline time.Duration
	// FreshnessTTL: GetFreshness is asked at most this often (it is not for
	// the hot path).
	FreshnessTTL time.Duration

	mu          sync.Mutex
	freshness   map[string]ViewFreshness
	freshnessAt time.Time
}

// NewClient uses conn (see Dial) for every call.
func NewClient(conn grpc.ClientConnInterface, deadline time.Duration) *Client {
	return &Client{Stub: freshetv1.NewFeatureServiceClient(conn), Deadline: deadline, FreshnessTTL: 5 * time.Second}
}

// GetFeatures asks for features of users in one batched call (the server
// takes up to 1000 entities per call by default: chunk larger batches).
func (c *Client) GetFeatures(ctx context.Context, features []string, users []int64) (*freshetv1.GetFeaturesResponse, error) {
	// The deadline travels to the server as grpc-timeout; the server stops
	// working on the call when it passes.
	ctx, cancel := context.WithTimeout(ctx, c.Deadline)
	defer cancel()
	entities := make([]*freshetv1.EntityKey, len(users))
	for i, u := range users {
		entities[i] = &freshetv1.EntityKey{Key: &freshetv1.EntityKey_Int64Key{Int64Key: u}}
	}
	return c.Stub.GetFeatures(ctx, &freshetv1.GetFeaturesRequest{Features: features, Entities: entities})
}

// ListViews says which views and features the server declares.
func (c *Client) ListViews(ctx context.Context) (*freshetv1.ListFeatureViewsResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Deadline)
	defer cancel()
	return c.Stub.ListFeatureViews(ctx, &freshetv1.ListFeatureViewsRequest{})
}

// Freshness returns the verdict of every view, asking the server at most
// every FreshnessTTL.
func (c *Client) Freshness(ctx context.Context) (map[string]ViewFreshness, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.freshness == nil || time.Since(c.freshnessAt) > c.FreshnessTTL {
		ctx, cancel := context.WithTimeout(ctx, c.Deadline)
		defer cancel()
		r, err := c.Stub.GetFreshness(ctx, &freshetv1.GetFreshnessRequest{})
		if err != nil {
			return nil, err
		}
		m := make(map[string]ViewFreshness, len(r.GetViews()))
		for _, v := range r.GetViews() {
			m[v.GetView()] = ViewFreshness{View: v.GetView(), Verdict: v.GetVerdict(), Age: v.GetAge().AsDuration(), Budget: v.GetBudget().AsDuration()}
		}
		c.freshness, c.freshnessAt = m, time.Now()
	}
	out := make(map[string]ViewFreshness, len(c.freshness))
	for k, v := range c.freshness {
		out[k] = v
	}
	return out, nil
}
