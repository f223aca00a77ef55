# frozen_string_literal: true

require "spec_helper"

# Shutdown drains: every request in flight when thrust gets SIGTERM is
# answered in full before it exits (count sent = count answered).
RSpec.describe "drain on SIGTERM" do
  it "answers every in-flight request, bodies intact, then exits with the app" do
    thrust, port = start_thrust_with_puma
    sent = 8
    replies = Queue.new
    clients = Array.new(sent) do |i|
      Thread.new do
        response = http_get(port, "/slow?s=0.6&i=#{i}")
        replies << [response.code, response.body]
      rescue StandardError => e
        replies << [e.class.name, e.message]
      end
    end
    # Puma has 4 threads: once 4 requests are running the other 4 are
    # queued behind them, all of them accepted by the proxy.
    wait_until(message: "requests running in the app") { thrust.output.scan("slow request started").size >= 4 }
    thrust.signal("TERM")
    clients.each(&:join)
    answers = Array.new(sent) { replies.pop }
    expect(answers).to all(eq(["200", "slow done"]))
    # Puma re-raises SIGTERM after its graceful stop: thrust reports 128+15.
    expect(thrust.wait(timeout: 15).exitstatus).to eq(143)
  end
end
