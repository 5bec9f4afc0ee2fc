// The gRPC service over real loopback connections: a MoeServe server in this process on the demo
// model (random weights, byte-level tokenizer), called through the generated stub.
#include "server/service.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"
#include "model/checkpoint.h"
#include "server/text_model.h"

namespace moeserve {
namespace {

namespace v1 = ::moeserve::v1;

struct ServerSetup {
  SchedulerOptions scheduler;
  ServiceOptions service;
};

class TestServer {
 public:
  explicit TestServer(const ServerSetup& setup) : service_(setup.service) {
    backend_.model =
        Model::FromWeights(DemoModelConfig(), RandomWeights(DemoModelConfig(), {.seed = 3}));
    backend_.tokenizer = Tokenizer::ByteLevelDemo();
    backend_.model_name = "demo (random weights)";
    backend_.random_weights = true;
    backend_.expert_load = std::make_unique<ExpertLoadTracker>(backend_.model->config(), 10);
    auto engine = MakeEngineOptions(*backend_.tokenizer, 4096);
    EXPECT_TRUE(engine.ok());
    ExpertLoadTracker* load = backend_.expert_load.get();
    backend_.scheduler = std::make_unique<Scheduler>(
        backend_.model.get(), *engine, setup.scheduler,
        [load](const StepResult& step, absl::Duration) { load->Add(step.layer_load); });
    service_.SetBackend(&backend_);
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    server_->GetHealthCheckService()->SetServingStatus(true);
    channel_ =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials());
    stub_ = v1::MoeServe::NewStub(channel_);
  }
  ~TestServer() {
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    backend_.scheduler.reset();
  }
  v1::MoeServe::Stub& stub() { return *stub_; }
  Scheduler& scheduler() { return *backend_.scheduler; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  Backend backend_;
  MoeServeService service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::MoeServe::Stub> stub_;
};

v1::GenerateRequest Request(const std::string& prompt, int max_new_tokens,
                            v1::RoutingMode mode = v1::ROUTING_MODE_TOKEN_CHOICE) {
  v1::GenerateRequest r;
  r.set_prompt(prompt);
  r.mutable_decoding()->set_max_new_tokens(max_new_tokens);
  r.mutable_decoding()->set_block_length(8);
  r.mutable_routing()->set_mode(mode);
  r.set_return_token_ids(true);
  return r;
}

grpc::Status Call(v1::MoeServe::Stub& stub, const v1::GenerateRequest& request,
                  v1::GenerateResponse* response, absl::Duration timeout = absl::Seconds(120)) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  return stub.Generate(&context, request, response);
}

TEST(ServiceTest, GenerateReportsUsageRoutingAndTimings) {
  TestServer server({});
  for (auto mode : {v1::ROUTING_MODE_TOKEN_CHOICE, v1::ROUTING_MODE_EXPERT_CHOICE}) {
    v1::GenerateResponse response;
    ASSERT_TRUE(Call(server.stub(), Request("Hello, world", 20, mode), &response).ok());
    EXPECT_NE(response.finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
    EXPECT_EQ(response.usage().prompt_tokens(), 12);  // the demo tokenizer: one id per byte
    EXPECT_EQ(response.usage().completion_tokens(), response.token_ids_size());
    EXPECT_LE(response.usage().completion_tokens(), 20);
    EXPECT_GT(response.usage().forwards(), 0);
    EXPECT_EQ(response.routing_stats().routing().mode(), mode);
    EXPECT_EQ(response.routing_stats().layers_size(), 3);  // the demo's MoE layers
    for (const auto& layer : response.routing_stats().layers()) {
      EXPECT_EQ(layer.experts_per_token_histogram_size(), 33);
      if (mode == v1::ROUTING_MODE_TOKEN_CHOICE) {
        EXPECT_EQ(layer.dropped_tokens(), 0);
        EXPECT_DOUBLE_EQ(layer.effective_capacity_factor(), 1.0);
      }
    }
    EXPECT_GT(response.timings().total_seconds(), 0);
    EXPECT_LE(response.timings().engine_seconds(), response.timings().total_seconds());
    EXPECT_FALSE(response.request_id().empty());
  }
}

TEST(ServiceTest, InvalidRequestsNameTheField) {
  TestServer server({});
  struct Case {
    std::string name;
    std::function<void(v1::GenerateRequest&)> mutate;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"no prompt", [](auto& r) { r.clear_input(); }, "prompt"},
      {"empty prompt", [](auto& r) { r.set_prompt(""); }, "prompt: is empty"},
      {"empty messages", [](auto& r) { r.mutable_messages(); }, "messages"},
      {"bad role",
       [](auto& r) {
         auto* m = r.mutable_messages()->add_messages();
         m->set_role("robot");
         m->set_content("hi");
       },
       "messages[0].role"},
      {"empty ids", [](auto& r) { r.mutable_prompt_token_ids(); }, "prompt_token_ids"},
      {"id out of vocab", [](auto& r) { r.mutable_prompt_token_ids()->add_ids(100000); },
       "token_ids[0]"},
      {"negative id", [](auto& r) { r.mutable_prompt_token_ids()->add_ids(-1); }, "token_ids[0]"},
      {"prompt over context", [](auto& r) { r.set_prompt(std::string(5000, 'a')); },
       "context limit"},
      {"routing mode", [](auto& r) { r.mutable_routing()->set_mode(v1::RoutingMode(9)); },
       "routing.mode"},
      {"capacity nan", [](auto& r) { r.mutable_routing()->set_capacity_factor(std::nan("")); },
       "routing.capacity_factor"},
      {"capacity negative", [](auto& r) { r.mutable_routing()->set_capacity_factor(-1); },
       "routing.capacity_factor"},
      {"capacity over limit", [](auto& r) { r.mutable_routing()->set_capacity_factor(65); },
       "routing.capacity_factor"},
      {"scope", [](auto& r) { r.mutable_routing()->set_scope(v1::RoutingScope(7)); },
       "routing.scope"},
      {"weighting", [](auto& r) { r.mutable_routing()->set_weighting(v1::Weighting(7)); },
       "routing.weighting"},
      {"max_new_tokens negative", [](auto& r) { r.mutable_decoding()->set_max_new_tokens(-1); },
       "decoding.max_new_tokens"},
      {"max_new_tokens over limit",
       [](auto& r) { r.mutable_decoding()->set_max_new_tokens(1 << 20); },
       "decoding.max_new_tokens"},
      {"block_length negative", [](auto& r) { r.mutable_decoding()->set_block_length(-3); },
       "decoding.block_length"},
      {"block_length over limit", [](auto& r) { r.mutable_decoding()->set_block_length(4096); },
       "decoding.block_length"},
      {"policy", [](auto& r) { r.mutable_decoding()->set_policy(v1::CommitPolicy(5)); },
       "decoding.policy"},
      {"threshold", [](auto& r) { r.mutable_decoding()->set_threshold(1.5); },
       "decoding.threshold"},
      {"steps", [](auto& r) { r.mutable_decoding()->set_steps(-2); }, "decoding.steps"},
      {"temperature", [](auto& r) { r.mutable_decoding()->set_temperature(-1); },
       "decoding.temperature"},
      {"top_k", [](auto& r) { r.mutable_decoding()->set_top_k(-1); }, "decoding.top_k"},
      {"top_p", [](auto& r) { r.mutable_decoding()->set_top_p(1.5); }, "decoding.top_p"},
      {"too many stops",
       [](auto& r) {
         for (int i = 0; i < 17; ++i) r.mutable_decoding()->add_stop("x");
       },
       "decoding.stop"},
      {"empty stop", [](auto& r) { r.mutable_decoding()->add_stop(""); }, "decoding.stop[0]"},
      {"long stop", [](auto& r) { r.mutable_decoding()->add_stop(std::string(300, 'x')); },
       "decoding.stop[0]"},
      {"request_id", [](auto& r) { r.set_request_id("has space"); }, "request_id"},
      {"priority", [](auto& r) { r.set_priority(1000); }, "priority"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest request = Request("Hello", 8);
    c.mutate(request);
    v1::GenerateResponse response;
    const grpc::Status status = Call(server.stub(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_NE(status.error_message().find(c.field), std::string::npos)
        << c.name << ": \"" << status.error_message() << "\" does not name " << c.field;
  }
  // The server is unharmed.
  v1::GenerateResponse response;
  EXPECT_TRUE(Call(server.stub(), Request("Hello", 8), &response).ok());
}

// Request scope: a request's tokens do not depend on what else is in the batch, for both modes,
// with requests of both modes running concurrently.
TEST(ServiceTest, OutputAloneEqualsOutputUnderConcurrentLoad) {
  TestServer server({});
  std::vector<v1::GenerateRequest> probes = {
      Request("The quick brown fox", 24, v1::ROUTING_MODE_TOKEN_CHOICE),
      Request("The quick brown fox", 24, v1::ROUTING_MODE_EXPERT_CHOICE)};
  probes[1].mutable_routing()->set_capacity_factor(1.0);
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : probes) {
    v1::GenerateResponse r;
    ASSERT_TRUE(Call(server.stub(), p, &r).ok());
    alone.emplace_back(r.token_ids().begin(), r.token_ids().end());
  }
  EXPECT_NE(alone[0], alone[1]) << "expert-choice should route (and decode) differently";
  std::vector<std::thread> threads;
  std::vector<std::vector<int32_t>> loaded(probes.size());
  std::atomic<int> failures{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest noise =
          Request(std::string(3 + 5 * i, 'a' + i), 16 + 4 * i,
                  i % 2 ? v1::ROUTING_MODE_EXPERT_CHOICE : v1::ROUTING_MODE_TOKEN_CHOICE);
      v1::GenerateResponse r;
      if (!Call(server.stub(), noise, &r).ok()) ++failures;
    });
  }
  for (size_t p = 0; p < probes.size(); ++p) {
    threads.emplace_back([&, p] {
      v1::GenerateResponse r;
      if (!Call(server.stub(), probes[p], &r).ok()) ++failures;
      loaded[p].assign(r.token_ids().begin(), r.token_ids().end());
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(loaded[0], alone[0]) << "token-choice";
  EXPECT_EQ(loaded[1], alone[1]) << "expert-choice, request scope";
}

TEST(ServiceTest, StreamSendsBlocksThenFinalAndMatchesUnary) {
  TestServer server({});
  v1::GenerateRequest request = Request("Stream me", 40);
  v1::GenerateResponse unary;
  ASSERT_TRUE(Call(server.stub(), request, &unary).ok());
  grpc::ClientContext context;
  auto reader = server.stub().GenerateStream(&context, request);
  v1::GenerateResponse message;
  std::string text;
  std::vector<int32_t> ids;
  int messages = 0;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&message)) {
    ++messages;
    EXPECT_EQ(finish, v1::FINISH_REASON_UNSPECIFIED) << "nothing may follow the final message";
    text += message.text();
    ids.insert(ids.end(), message.token_ids().begin(), message.token_ids().end());
    finish = message.finish_reason();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_NE(finish, v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_EQ(text, unary.text());
  EXPECT_EQ(ids, std::vector<int32_t>(unary.token_ids().begin(), unary.token_ids().end()));
  EXPECT_GE(messages, 2);
}

TEST(ServiceTest, StopStringIsCutAndNeverStreamed) {
  TestServer server({});
  // Find text the model generates, then use a piece of it (two whole characters after the first
  // block, none of them U+FFFD) as the stop string.
  v1::GenerateResponse free_run;
  ASSERT_TRUE(Call(server.stub(), Request("abc", 48), &free_run).ok());
  const std::string& generated = free_run.text();
  auto char_length = [&](size_t i) {
    const unsigned char c = generated[i];
    return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  };
  std::string stop;
  size_t i = 0;
  for (int chars = 0; i < generated.size() && chars < 8; ++chars) i += char_length(i);
  for (; i < generated.size() && stop.empty(); i += char_length(i)) {
    const size_t j = i + char_length(i);
    if (j >= generated.size()) break;
    const std::string candidate = generated.substr(i, char_length(i) + char_length(j));
    if (candidate.find("\xEF\xBF\xBD") == std::string::npos) stop = candidate;
  }
  ASSERT_FALSE(stop.empty()) << "no usable stop string in " << generated;
  v1::GenerateRequest request = Request("abc", 48);
  request.mutable_decoding()->add_stop(stop);
  grpc::ClientContext context;
  auto reader = server.stub().GenerateStream(&context, request);
  v1::GenerateResponse message;
  std::string streamed;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&message)) {
    streamed += message.text();
    finish = message.finish_reason();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(finish, v1::FINISH_REASON_STOP);
  EXPECT_EQ(streamed.find(stop), std::string::npos) << streamed;
  v1::GenerateResponse unary;
  ASSERT_TRUE(Call(server.stub(), request, &unary).ok());
  EXPECT_EQ(unary.text(), streamed);
}

TEST(ServiceTest, OverloadRefusesTheExcessAndCompletesEveryAcceptedRequest) {
  ServerSetup setup;
  setup.scheduler.max_concurrent_sequences = 1;
  setup.scheduler.max_queue_length = 2;
  TestServer server(setup);
  std::atomic<int> ok{0}, exhausted{0}, other{0};
  std::vector<std::thread> burst;
  for (int i = 0; i < 12; ++i) {
    burst.emplace_back([&] {
      v1::GenerateResponse r;
      const grpc::Status s = Call(server.stub(), Request("burst", 64), &r);
      if (s.ok()) {
        ++ok;
      } else if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        EXPECT_NE(s.error_message().find("queue is full"), std::string::npos);
        ++exhausted;
      } else {
        ++other;
      }
    });
  }
  for (auto& t : burst) t.join();
  EXPECT_EQ(ok + exhausted, 12);
  EXPECT_EQ(other.load(), 0);
  EXPECT_GE(ok.load(), 1);
  EXPECT_GE(exhausted.load(), 1);
  EXPECT_TRUE(server.scheduler().WaitIdle(absl::Now() + absl::Seconds(5)));
}

TEST(ServiceTest, DeadlinesAreHonoured) {
  ServerSetup setup;
  setup.scheduler.max_concurrent_sequences = 1;
  TestServer server(setup);
  v1::GenerateResponse r;
  // Far too short for 4096 tokens: DEADLINE_EXCEEDED, and the slot is freed.
  const grpc::Status s =
      Call(server.stub(), Request("deadline", 4000), &r, absl::Milliseconds(300));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(server.scheduler().WaitIdle(absl::Now() + absl::Seconds(5)));
  EXPECT_TRUE(Call(server.stub(), Request("after", 8), &r).ok());
}

TEST(ServiceTest, CancellingAStreamFreesItsSlotForTheNextRequest) {
  ServerSetup setup;
  setup.scheduler.max_concurrent_sequences = 1;
  setup.scheduler.max_queue_length = 4;
  TestServer server(setup);
  grpc::ClientContext context;
  auto reader = server.stub().GenerateStream(&context, Request("long one", 4000));
  v1::GenerateResponse first;
  ASSERT_TRUE(reader->Read(&first));  // it is running and holds the only slot
  EXPECT_EQ(server.scheduler().stats().running_sequences, 1);
  context.TryCancel();
  while (reader->Read(&first)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The next request gets the slot well before the cancelled one could have finished.
  v1::GenerateResponse r;
  const absl::Time start = absl::Now();
  EXPECT_TRUE(Call(server.stub(), Request("next", 8), &r, absl::Seconds(30)).ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
  EXPECT_TRUE(server.scheduler().WaitIdle(absl::Now() + absl::Seconds(5)));
}

TEST(ServiceTest, BearerTokenGuardsEveryCall) {
  ServerSetup setup;
  setup.service.auth_token = "s3cret-token";
  TestServer server(setup);
  auto call_info = [&](const std::string& header) {
    grpc::ClientContext context;
    if (!header.empty()) context.AddMetadata("authorization", header);
    v1::ModelInfo info;
    return server.stub().GetModelInfo(&context, {}, &info);
  };
  EXPECT_EQ(call_info("").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call_info("Bearer wrong").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call_info("Bearer s3cret-tokenX").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  const grpc::Status denied = call_info("Bearer wrong");
  EXPECT_EQ(denied.error_message().find("s3cret"), std::string::npos);
  EXPECT_TRUE(call_info("Bearer s3cret-token").ok());
  {
    grpc::ClientContext context;
    v1::GenerateResponse r;
    EXPECT_EQ(server.stub().Generate(&context, Request("x", 8), &r).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  // Health needs no token.
  grpc::ClientContext context;
  grpc::Slice empty_slice("");
  grpc::ByteBuffer empty_request(&empty_slice, 1), response;  // an empty HealthCheckRequest
  grpc::GenericStub generic(server.channel());
  // A raw call of grpc.health.v1.Health/Check with an empty HealthCheckRequest.
  grpc::Status health_status;
  absl::Notification done;
  generic.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &empty_request,
                    &response, [&](grpc::Status s) {
                      health_status = s;
                      done.Notify();
                    });
  done.WaitForNotification();
  EXPECT_TRUE(health_status.ok()) << health_status.error_message();
}

TEST(ServiceTest, ExpertLoadCountsEveryRoutedToken) {
  TestServer server({});
  v1::GenerateResponse r;
  ASSERT_TRUE(Call(server.stub(), Request("load", 16, v1::ROUTING_MODE_TOKEN_CHOICE), &r).ok());
  ASSERT_TRUE(Call(server.stub(), Request("load", 16, v1::ROUTING_MODE_EXPERT_CHOICE), &r).ok());
  grpc::ClientContext context;
  v1::ExpertLoad load;
  ASSERT_TRUE(server.stub().GetExpertLoad(&context, {}, &load).ok());
  EXPECT_GT(load.forwards(), 0);
  ASSERT_EQ(load.matrices_size(), 2);
  for (const v1::ExpertLoadMatrix& m : load.matrices()) {
    ASSERT_EQ(m.num_layers(), 3);
    ASSERT_EQ(m.num_experts(), 32);
    ASSERT_EQ(m.tokens_per_expert_size(), 3 * 32);
    for (int l = 0; l < 3; ++l) {
      int64_t assignments = 0;
      for (int e = 0; e < 32; ++e) assignments += m.tokens_per_expert(l * 32 + e);
      EXPECT_GT(m.tokens(l), 0);
      if (m.mode() == v1::ROUTING_MODE_TOKEN_CHOICE) {
        EXPECT_EQ(assignments, m.tokens(l) * 4);  // top-4, every token
        EXPECT_EQ(m.dropped_tokens(l), 0);
      } else {
        // Expert-choice: every expert took the same number of tokens.
        for (int e = 1; e < 32; ++e)
          EXPECT_EQ(m.tokens_per_expert(l * 32 + e), m.tokens_per_expert(l * 32));
      }
    }
  }
}

// The demo model, its tokenizer and engine options, for the scheduler tests below.
struct SchedulerTestBed {
  ModelConfig config = DemoModelConfig();
  std::unique_ptr<Model> model = Model::FromWeights(config, RandomWeights(config, {.seed = 5}));
  std::unique_ptr<Tokenizer> tokenizer = Tokenizer::ByteLevelDemo();
  EngineOptions engine = *MakeEngineOptions(*tokenizer, 4096);

  // A three-token prompt decoded in blocks of 8.
  static GenerationRequest Request(const std::string& id, int64_t max_new_tokens = 8) {
    GenerationRequest r;
    r.request_id = id;
    r.prompt = {1, 2, 3};
    r.decode.max_new_tokens = max_new_tokens;
    r.decode.block_length = 8;
    return r;
  }
};

// With one slot, waiting requests are admitted by priority, then by arrival.
TEST(SchedulerTest, AdmitsByPriorityThenArrival) {
  SchedulerTestBed bed;
  Scheduler scheduler(bed.model.get(), bed.engine,
                      {.max_queue_length = 8, .max_concurrent_sequences = 1});
  auto request = [](const std::string& id, int priority) {
    GenerationRequest r = SchedulerTestBed::Request(id);
    r.priority = priority;
    return r;
  };
  std::vector<std::shared_ptr<RequestHandle>> handles;
  for (auto [id, priority] : std::vector<std::pair<std::string, int>>{
           {"first", 0}, {"low", -1}, {"normal", 0}, {"high", 5}, {"normal2", 0}}) {
    auto h = scheduler.Submit(request(id, priority));
    ASSERT_TRUE(h.ok()) << h.status();
    handles.push_back(*h);
    // "first" takes the only slot before the others arrive.
    while (id == "first" && scheduler.stats().running_sequences == 0) {
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  // Order of completion = order of admission (one slot, equal lengths).
  std::vector<std::pair<absl::Time, std::string>> done;
  for (auto& h : handles) {
    while (true) {
      auto e = h->Next(absl::Seconds(30));
      ASSERT_TRUE(e.has_value());
      if (!e->final) continue;
      ASSERT_TRUE(e->status.ok()) << e->status;
      done.push_back({h->request().arrival + e->total_time, h->request().request_id});
      break;
    }
  }
  std::sort(done.begin(), done.end());
  std::vector<std::string> order;
  for (auto& [t, id] : done) order.push_back(id);
  EXPECT_EQ(order, (std::vector<std::string>{"first", "high", "normal", "normal2", "low"}));
}

// A queued request whose deadline passes (or would pass within the next step) before it gets a
// slot is never started: it ends with DEADLINE_EXCEEDED and took part in no forward.
TEST(SchedulerTest, ARequestWhoseDeadlineCannotBeMetIsNotStarted) {
  SchedulerTestBed bed;
  Scheduler scheduler(bed.model.get(), bed.engine,
                      {.max_queue_length = 8, .max_concurrent_sequences = 1});
  const GenerationRequest busy = SchedulerTestBed::Request("busy", 256);
  auto first = scheduler.Submit(busy);
  ASSERT_TRUE(first.ok()) << first.status();
  while (scheduler.stats().running_sequences == 0) absl::SleepFor(absl::Milliseconds(1));
  GenerationRequest late = SchedulerTestBed::Request("late");
  late.deadline = absl::Now() + absl::Milliseconds(50);
  auto second = scheduler.Submit(late);
  ASSERT_TRUE(second.ok()) << second.status();
  while (true) {
    auto e = (*second)->Next(absl::Seconds(30));
    ASSERT_TRUE(e.has_value());
    if (!e->final) continue;
    EXPECT_EQ(e->status.code(), absl::StatusCode::kDeadlineExceeded) << e->status;
    EXPECT_THAT(std::string(e->status.message()), ::testing::HasSubstr("not started"));
    EXPECT_EQ(e->stats.forwards, 0);
    break;
  }
  EXPECT_EQ(scheduler.stats().running_sequences, 1);  // the busy request goes on
}

// A step that fails (here: an engine whose mask id is outside the vocabulary, which every forward
// rejects) ends the running request with INTERNAL, calls on_engine_failure once (the server turns
// health NOT_SERVING there), and every later request is refused with UNAVAILABLE.
TEST(SchedulerTest, AnEngineFailureEndsRequestsAndIsReported) {
  SchedulerTestBed bed;
  bed.engine.mask_id = static_cast<int32_t>(bed.config.vocab_size);
  std::atomic<int> failures{0};
  SchedulerOptions options;
  options.on_engine_failure = [&failures](const absl::Status& status) {
    EXPECT_FALSE(status.ok());
    ++failures;
  };
  Scheduler scheduler(bed.model.get(), bed.engine, options);
  GenerationRequest r = SchedulerTestBed::Request("doomed");
  auto h = scheduler.Submit(r);
  ASSERT_TRUE(h.ok()) << h.status();
  while (true) {
    auto e = (*h)->Next(absl::Seconds(30));
    ASSERT_TRUE(e.has_value());
    if (!e->final) continue;
    EXPECT_EQ(e->status.code(), absl::StatusCode::kInternal) << e->status;
    break;
  }
  EXPECT_EQ(failures.load(), 1);
  EXPECT_TRUE(scheduler.stats().failed);
  r.request_id = "after";
  EXPECT_EQ(scheduler.Submit(r).status().code(), absl::StatusCode::kUnavailable);
}

TEST(ServiceTest, ModelInfoDescribesTheDemo) {
  TestServer server({});
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(server.stub().GetModelInfo(&context, {}, &info).ok());
  EXPECT_EQ(info.architecture(), "llada2_moe");
  EXPECT_TRUE(info.random_weights());
  EXPECT_EQ(info.num_experts(), 32);
  EXPECT_EQ(info.mask_token_id(), 257);
  EXPECT_EQ(info.routing_modes_size(), 2);
  EXPECT_EQ(info.routing_defaults().mode(), v1::ROUTING_MODE_TOKEN_CHOICE);
  EXPECT_DOUBLE_EQ(info.routing_defaults().capacity_factor(), 1.25);
}

}  // namespace
}  // namespace moeserve
