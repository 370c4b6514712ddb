// Command freshet-example scores a batch of users with features from
// freshet-server and prints everything as JSON (the same shape as the
// Python example's):
//
//	freshet-example --address 127.0.0.1:50051 --token T --users 1,2,404
//
// Timestamps (event times and timestamp values) are epoch milliseconds. On a
// gRPC error it prints {"error": {"code": "UNAUTHENTICATED", "message": ...}}
// and exits 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"freshetclient/freshet"
)

type jsonValue struct {
	Status      string `json:"status"`
	Value       any    `json:"value"`
	EventTimeMs *int64 `json:"event_time_ms"`
}

type jsonUser struct {
	User   int64                `json:"user"`
	Values map[string]jsonValue `json:"values"`
	Vector []float64            `json:"vector"`
	Score  float64              `json:"score"`
}

type jsonFreshness struct {
	Verdict  string `json:"verdict"`
	Trusted  bool   `json:"trusted"`
	AgeMs    int64  `json:"age_ms"`
	BudgetMs int64  `json:"budget_ms"`
}

type output struct {
	Client     string                   `json:"client"`
	Features   []string                 `json:"features"`
	Freshness  map[string]jsonFreshness `json:"freshness"`
	ServedAtMs int64                    `json:"served_at_ms"`
	Users      []jsonUser               `json:"users"`
}

func env(name, fallback string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return fallback
}

func main() {
	address := flag.String("address", env("FRESHET_ADDRESS", "127.0.0.1:50051"), "host:port of freshet-server")
	token := flag.String("token", os.Getenv("FRESHET_TOKEN"), "bearer token (default: $FRESHET_TOKEN)")
	usersFlag := flag.String("users", "1,2,404", "comma-separated user ids (int64)")
	deadlineMs := flag.Int("deadline-ms", 500, "deadline of each call, all retries included")
	tlsCA := flag.String("tls-ca", "", "PEM CA certificate: use TLS (default: plaintext)")
	flag.Parse()

	var users []int64
	for _, s := range strings.Split(*usersFlag, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		u, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "--users: %v\n", err)
			os.Exit(2)
		}
		users = append(users, u)
	}

	// One connection for the whole process.
	conn, err := freshet.Dial(*address, freshet.Options{Token: *token, TLSCA: *tlsCA})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()
	client := freshet.NewClient(conn, time.Duration(*deadlineMs)*time.Millisecond)

	ctx := context.Background()
	model, err := freshet.NewModel(ctx, client)
	if err != nil {
		fail(err)
	}
	scored, err := model.Score(ctx, users)
	if err != nil {
		fail(err)
	}
	report(scored)
}

// fail prints a gRPC error as JSON and exits 1.
func fail(err error) {
	s, _ := status.FromError(err)
	out, _ := json.Marshal(map[string]any{"error": map[string]string{"code": codeName(s.Code()), "message": s.Message()}})
	fmt.Println(string(out))
	os.Exit(1)
}

// codeName spells a code as gRPC's docs do: "ResourceExhausted" is
// RESOURCE_EXHAUSTED.
func codeName(c codes.Code) string {
	if c == codes.OK {
		return "OK"
	}
	var b strings.Builder
	for i, r := range c.String() {
		if i > 0 && unicode.IsUpper(r) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}

// report prints what Score found as JSON.
func report(s *freshet.Scored) {
	out := output{Client: "go", Features: s.Names, Freshness: map[string]jsonFreshness{}, ServedAtMs: s.ServedAt.UnixMilli()}
	views := make([]string, 0, len(s.Freshness))
	for v := range s.Freshness {
		views = append(views, v)
	}
	sort.Strings(views)
	for _, v := range views {
		f := s.Freshness[v]
		out.Freshness[v] = jsonFreshness{Verdict: f.Verdict.String(), Trusted: f.Trusted(), AgeMs: f.Age.Milliseconds(), BudgetMs: f.Budget.Milliseconds()}
	}
	for i, row := range s.Rows {
		u := jsonUser{User: s.Users[i], Values: map[string]jsonValue{}, Vector: s.Vectors[i], Score: math.Round(s.Scores[i]*1e6) / 1e6}
		for name, f := range row {
			jv := jsonValue{Status: f.Status.String(), Value: f.Value}
			if t, ok := f.Value.(time.Time); ok {
				jv.Value = t.UnixMilli()
			}
			if !f.EventTime.IsZero() {
				ms := f.EventTime.UnixMilli()
				jv.EventTimeMs = &ms
			}
			u.Values[name] = jv
		}
		out.Users = append(out.Users, u)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
