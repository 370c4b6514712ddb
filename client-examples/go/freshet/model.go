package freshet

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"
)

// A typical model server's use of Freshet: at startup, check that every
// feature the model was trained on exists; per prediction, one batched
// GetFeatures, a feature vector in the model's fixed order with defaults for
// what is missing, untrusted or stale, then predict. The "model" is a toy
// logistic score; the point is the plumbing around it.

// Features are the model's inputs in the order it was trained on. Never
// take the order from the response: build the vector by name.
var Features = []string{
	"user_activity:events_10s",
	"user_activity:events_1m",
	"user_activity:events_1h",
	"user_activity:last_event_type",
	"user_activity:last_event_at",
	"orders:orders_1h",
	"orders:spend_1h",
	"orders:avg_order_1h",
	"orders:max_order_1h",
	"orders:items_1h",
	"orders:last_express",
}

// Defaults are what the model sees when a value is not usable (NOT_FOUND,
// NULL_VALUE, OUTSIDE_MAX_AGE, or its view is not fresh enough to trust):
// the values it was trained with for "unknown".
var Defaults = map[string]float64{
	"user_activity:events_10s":      0,
	"user_activity:events_1m":       0,
	"user_activity:events_1h":       0,
	"user_activity:last_event_type": 0,
	"user_activity:last_event_at":   1e6, // seconds since the last event: "long ago"
	"orders:orders_1h":              0,
	"orders:spend_1h":               0,
	"orders:avg_order_1h":           25,
	"orders:max_order_1h":           25,
	"orders:items_1h":               0,
	"orders:last_express":           0,
}

// eventTypes encodes the categorical feature as at training time.
var eventTypes = map[string]float64{"view": 1, "click": 2, "add_to_cart": 3, "purchase": 4}

var (
	weights = []float64{0.08, 0.05, 0.01, 0.3, -1e-6, 0.4, 0.01, 0.005, 0.002, 0.05, 0.2}
	bias    = -2.0
)

func encode(name string, f Feature, now time.Time) float64 {
	if name == "user_activity:last_event_type" {
		s, _ := f.Value.(string)
		return eventTypes[s]
	}
	switch v := f.Value.(type) {
	case int64:
		return float64(v)
	case float64:
		return v
	case bool:
		if v {
			return 1
		}
		return 0
	case time.Time:
		return math.Max(0, now.Sub(v).Seconds())
	default:
		return 0
	}
}

// Vector is the model's input for one entity, in Features order.
func Vector(row map[string]Feature, trusted map[string]bool, now time.Time) []float64 {
	out := make([]float64, len(Features))
	for i, name := range Features {
		f, ok := row[name]
		view, _, _ := strings.Cut(name, ":")
		if ok && f.Present() && trusted[view] {
			out[i] = encode(name, f, now)
		} else {
			out[i] = Defaults[name]
		}
	}
	return out
}

// Predict is the toy model.
func Predict(v []float64) float64 {
	z := bias
	for i, x := range v {
		z += weights[i] * x
	}
	return 1 / (1 + math.Exp(-z))
}

// Model scores users with features from Freshet.
type Model struct {
	Client *Client
}

// NewModel fails at startup, not at the first request, if the store does
// not declare a feature the model needs (a renamed view, a typo).
func NewModel(ctx context.Context, c *Client) (*Model, error) {
	views, err := c.ListViews(ctx)
	if err != nil {
		return nil, err
	}
	declared := map[string]bool{}
	for _, v := range views.GetViews() {
		for _, f := range v.GetFeatures() {
			declared[v.GetName()+":"+f.GetName()] = true
		}
	}
	var missing []string
	for _, f := range Features {
		if !declared[f] {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("features unknown to the feature store: %v", missing)
	}
	return &Model{Client: c}, nil
}

// Scored is what Score found and computed for a batch.
type Scored struct {
	Freshness map[string]ViewFreshness
	Trusted   map[string]bool
	Users     []int64
	Names     []string
	Rows      []map[string]Feature
	Vectors   [][]float64
	Scores    []float64
	ServedAt  time.Time
}

// Score fetches features of a batch of users (one GetFeatures; GetFreshness
// at most every FreshnessTTL) and scores them.
func (m *Model) Score(ctx context.Context, users []int64) (*Scored, error) {
	freshness, err := m.Client.Freshness(ctx)
	if err != nil {
		return nil, err
	}
	trusted := map[string]bool{}
	for view, f := range freshness {
		trusted[view] = f.Trusted()
	}
	r, err := m.Client.GetFeatures(ctx, Features, users)
	if err != nil {
		return nil, err
	}
	// Windows were evaluated as of served_at: measure ages from it too.
	servedAt := r.GetServedAt().AsTime()
	s := &Scored{Freshness: freshness, Trusted: trusted, Users: users, Names: r.GetFeatureNames(), Rows: Decode(r), ServedAt: servedAt}
	for _, row := range s.Rows {
		v := Vector(row, trusted, servedAt)
		s.Vectors = append(s.Vectors, v)
		s.Scores = append(s.Scores, Predict(v))
	}
	return s, nil
}
