# frozen_string_literal: true

require "spec_helper"
require "English"
require "fileutils"
require "stringio"
require_relative "../lib/thruster/binary"

# The Railtie in a real Rails app (the system's Rails 6.1, no Bundler) under
# a real Puma, requested directly the way the proxy would: X-Sendfile only
# for requests carrying the proxy's token. Needs no compiled extension.
RSpec.describe "X-Sendfile in a Rails app (Thruster::Railtie)" do
  def token = "rails-spec-token-6f1d2c9e8a7b"
  def token_header = "X-Thruster-Sendfile-Token"

  # One Rails boot (a few seconds) for the whole group; the global
  # after-each reaper only kills processes made with ChildProcess.start.
  before(:context) do
    @dir = Dir.mktmpdir("thruster-rails-sendfile")
    @report = File.join(@dir, "report.txt")
    @static = File.join(@dir, "static.txt")
    File.write(@report, "quarterly numbers\n" * 500)
    File.write(@static, "served from public/\n")
    @port = free_port
    env = { "RUBYLIB" => File.join(ROOT, "lib"), "THRUSTER_RS_SENDFILE_TOKEN" => token,
            "SENDFILE_FIXTURE_DIR" => @dir, "RAILS_ENV" => "production", "RACK_ENV" => nil,
            "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }
    @puma = ChildProcess.new(env, [RbConfig.ruby, Gem.bin_path("puma", "puma"), "-b", "tcp://127.0.0.1:#{@port}",
                                   "-t", "1:4", File.join(FIXTURES, "rails_app/config.ru")],
                             stdin: :close, chdir: ROOT)
    begin
      wait_for_ok(@port, timeout: 30, message: "the Rails fixture under Puma")
    rescue StandardError => e
      raise "#{e.message}; Puma's output:\n#{@puma.output}"
    end
  end

  after(:context) do
    @puma&.kill_group
    FileUtils.rm_rf(@dir) if @dir
  end

  def get(path, headers = {}) = http_get(@port, path, headers)

  def expect_full_file(response, file)
    expect(response.code).to eq("200")
    expect(response["X-Sendfile"]).to be_nil
    expect(response.body).to eq(File.read(file))
  end

  it "answers send_file with X-Sendfile and an empty body when the proxy's token is sent" do
    response = get("/download", token_header => token)
    expect(response.code).to eq("200")
    expect(response["X-Sendfile"]).to eq(File.expand_path(@report))
    expect(response["Content-Length"]).to eq("0")
    expect(response.body.to_s).to eq("")
    expect(response["Content-Disposition"]).to start_with("attachment")
  end

  it "sends the file itself without the token, for a client's X-Sendfile-Type, or for a wrong token" do
    aggregate_failures do
      expect_full_file(get("/download"), @report)
      expect_full_file(get("/download", "X-Sendfile-Type" => "X-Sendfile"), @report)
      expect_full_file(get("/download", token_header => "#{token}x", "X-Sendfile-Type" => "X-Sendfile"), @report)
      expect_full_file(get("/download", token_header => ""), @report)
    end
  end

  it "does the same for files ActionDispatch::Static serves from public/" do
    response = get("/static.txt", token_header => token)
    expect(response["X-Sendfile"]).to eq(File.expand_path(@static))
    expect(response.body.to_s).to eq("")
    expect_full_file(get("/static.txt", "X-Sendfile-Type" => "X-Sendfile"), @static)
  end

  it "runs the middleware right before Rack::Sendfile and hides the token from the app" do
    seen = JSON.parse(get("/inspect", token_header => token).body)
    middleware = seen["middleware"]
    expect(middleware.index("Thruster::Sendfile")).to eq(middleware.index("Rack::Sendfile") - 1)
    expect(seen).to include("token_header" => nil, "token_env" => false)
  end
end

# lib/thruster.rb (what Bundler.require loads) brings in the Railtie only
# when Rails is loaded. A stand-in for the compiled extension lets this run
# before `rake compile`.
RSpec.describe "loading thruster-rs with and without Rails" do
  let(:lib) { Dir.mktmpdir("thruster-lib") }

  before do
    FileUtils.cp_r(File.join(ROOT, "lib/."), lib)
    File.write(File.join(lib, "thruster/thruster_rs.rb"),
               "module Thruster; module Native; def self.core_version = Thruster::VERSION; end; end\n")
  end

  after { FileUtils.rm_rf(lib) }

  def ruby_output(code)
    out = IO.popen({ "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil }, [RbConfig.ruby, "-I", lib, "-e", code],
                   err: %i[child out], &:read)
    expect($CHILD_STATUS).to be_success, out
    out.strip
  end

  it "defines the Railtie when Rails is loaded first, and autoloads the middleware either way" do
    expect(ruby_output('require "rails"; require "thruster-rs"; print Thruster::Railtie.superclass'))
      .to eq("Rails::Railtie")
    expect(ruby_output('require "thruster-rs"; print defined?(Rails).inspect, " ", Thruster::Sendfile.name'))
      .to eq("nil Thruster::Sendfile")
  end

  it "defines the Railtie when the gem comes first, once the app class is defined, and before that not" do
    code = <<~RUBY
      require "thruster-rs"
      require "rails"
      print defined?(Thruster::Railtie).inspect, " "
      class App < Rails::Application; end
      print Thruster::Railtie.superclass, " ", Rails::Railtie.subclasses.count(Thruster::Railtie)
    RUBY
    expect(ruby_output(code)).to eq("nil Rails::Railtie 1")
  end
end

# Under `thrust`, with the Gemfile line Rails 8 writes for basecamp's gem
# renamed (`gem "thruster-rs", require: false`): nothing in the app requires
# the gem, so `thrust` loads the Railtie hook into it through RUBYOPT. Also
# the line the README recommends, `require: "thruster/railtie"`.
RSpec.describe "X-Sendfile in a Rails app under thrust" do
  let(:dir) { Dir.mktmpdir("thruster-rails-thrust") }
  let(:report) { File.join(dir, "report.txt") }

  before { File.write(report, (1..400).map { |i| format("line %04d of the report\n", i) }.join) }
  after { FileUtils.rm_rf(dir) }

  { "" => 'gem "thruster-rs", require: false',
    "thruster/railtie" => 'gem "thruster-rs", require: "thruster/railtie"' }.each do |gem_require, line|
    it "answers Range on send_file with the proxy's 206 (#{line})" do
      thrust_path # compiled
      app = File.join(FIXTURES, "rails_app")
      # Bundler puts the gem's lib/ on the load path; with require: false
      # nothing needs it there.
      rubylib = gem_require.empty? ? nil : File.join(ROOT, "lib")
      env = { "HTTP_PORT" => "0", "TARGET_PORT" => free_port.to_s, "LOG_REQUESTS" => "false",
              "THRUSTER_MODE" => "none", "THRUSTER_GEM_REQUIRE" => gem_require, "SENDFILE_FIXTURE_DIR" => dir,
              "RAILS_ENV" => "production", "RACK_ENV" => nil, "RUBYLIB" => rubylib,
              "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }
      thrust = ChildProcess.start(env, RbConfig.ruby, File.join(ROOT, "exe/thrust"),
                                  RbConfig.ruby, Gem.bin_path("puma", "puma"), "-C", File.join(app, "config/puma.rb"),
                                  File.join(app, "config.ru"), chdir: app) # the app's root, as in production
      port = thrust.http_port
      wait_for_ok(port, timeout: 40, message: "the Rails fixture under thrust")
      response = http_get(port, "/download", { "Range" => "bytes=0-9" })
      expect(response.code).to eq("206"), "#{response.code}; output:\n#{thrust.output}"
      expect(response["Content-Range"]).to eq("bytes 0-9/#{File.size(report)}")
      expect(response.body).to eq(File.binread(report, 10))
    end
  end
end

RSpec.describe "Thruster::Binary.app_rubyopt" do
  let(:binary) { Thruster::Binary }
  let(:hook) { Thruster::Binary::RAILTIE_HOOK }

  it "adds the Railtie hook to a Rails app's RUBYOPT, once, keeping what is there" do
    expect(binary.app_rubyopt(nil, rails_app: true)).to eq("-r#{hook}")
    expect(binary.app_rubyopt("-W0 -rbundler/setup", rails_app: true)).to eq("-W0 -rbundler/setup -r#{hook}")
    expect(binary.app_rubyopt("-r#{hook} -W0", rails_app: true)).to eq("-r#{hook} -W0")
  end

  it "leaves RUBYOPT alone outside a Rails app's root (no config/application.rb)" do
    expect(binary.app_rubyopt("-W0", rails_app: false)).to eq("-W0")
    Dir.chdir(File.join(FIXTURES, "rails_app")) { expect(binary.app_rubyopt(nil)).to eq("-r#{hook}") }
    Dir.chdir(FIXTURES) { expect(binary.app_rubyopt(nil)).to be_nil }
  end

  it "says at start-up what to put in the Gemfile when the hook's path cannot go in RUBYOPT" do
    io = StringIO.new
    expect(binary.app_rubyopt("-W0", hook: "/opt/my gems/railtie_hook.rb", rails_app: true, io:)).to eq("-W0")
    expect(io.string).to include("X-Sendfile stays off", 'require: "thruster/railtie"')
  end
end
