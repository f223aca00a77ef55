# frozen_string_literal: true

require "spec_helper"
require "fileutils"

# X-Sendfile in a real Rails app (the system's Rails 6.1, no Bundler) with
# the proxy inside the Puma master. config/application.rb requires "rails",
# then "thruster-rs", as Bundler.require would; the gem itself was loaded
# earlier by the plugin or by config/puma.rb, so the Railtie must be
# installed all the same. The proof: a Range request for a send_file action
# gets the proxy's 206 with exactly the bytes asked for (Rails alone answers
# 200 with the whole file).
RSpec.describe "X-Sendfile in a Rails app with the proxy in-process" do
  let(:dir) { Dir.mktmpdir("thruster-rails-inproc") }
  let(:report) { File.join(dir, "report.txt") }

  before do
    FileUtils.mkdir_p(File.join(dir, "tmp"))
    File.write(report, (1..400).map { |i| format("line %04d of the report\n", i) }.join)
  end

  after { FileUtils.rm_rf(dir) }

  def start_rails(mode:, workers:, preload:, gem_require: "thruster-rs")
    port = free_port
    env = { "PORT" => port.to_s, "THRUSTER_MODE" => mode, "WORKERS" => workers.to_s,
            "PRELOAD" => preload ? "1" : "0", "THRUSTER_GEM_REQUIRE" => gem_require,
            "SENDFILE_FIXTURE_DIR" => dir, "RAILS_ENV" => "production", "RACK_ENV" => nil,
            "LOG_REQUESTS" => "false", "RUBYLIB" => File.join(ROOT, "lib"),
            "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }
    app = File.join(FIXTURES, "rails_app")
    puma = ChildProcess.start(env, RbConfig.ruby, Gem.bin_path("puma", "puma"),
                              "-C", File.join(app, "config/puma.rb"), File.join(app, "config.ru"), chdir: dir)
    begin
      wait_for_ok(port, timeout: 40, message: "the Rails fixture (#{mode})")
    rescue StandardError => e
      raise "#{e.message}; Puma's output:\n#{puma.output}"
    end
    port
  end

  # Bursts of concurrent Range requests (sequential ones would reuse one
  # pooled connection to one worker) until `workers` different processes
  # have answered — without preload_app! each worker loads the app on its
  # own. Every answer must be the proxy's 206.
  def expect_proxy_range(port, workers: 1)
    pids = []
    wait_until(timeout: 20, message: "answers from #{workers} worker(s)") do
      responses = Array.new(8) { Thread.new { http_get(port, "/download", { "Range" => "bytes=0-9" }) } }.map(&:value)
      aggregate_failures do
        responses.each do |response|
          expect(response.code).to eq("206")
          expect(response["Content-Range"]).to eq("bytes 0-9/#{File.size(report)}")
          expect(response.body).to eq(File.binread(report, 10))
        end
      end
      (pids |= responses.map { |r| r["X-Pid"] }).size >= workers
    end
  end

  [["plugin", "plugin :thruster_rs"], ["start", 'require "thruster-rs" + Thruster.start in config/puma.rb']]
    .each do |mode, how|
    [[0, false, "single mode"], [2, false, "2 workers, no preload_app!"],
     [2, true, "2 workers, preload_app!"]].each do |workers, preload, kind|
      it "answers Range on send_file with the proxy's 206 (#{how}, #{kind})" do
        port = start_rails(mode:, workers:, preload:)
        expect_proxy_range(port, workers: [workers, 1].max)
      end
    end
  end

  it "installs the Railtie with `gem \"thruster-rs\", require: false` (the plugin loads the gem)" do
    port = start_rails(mode: "plugin", workers: 0, preload: false, gem_require: "")
    expect_proxy_range(port)
  end
end
