# frozen_string_literal: true

require "spec_helper"
require "fileutils"
require "rack"
require "rack/mock"
require "thruster/sendfile"

# Thruster::Sendfile in front of a real Rack::Sendfile and Rack::Files.
RSpec.describe Thruster::Sendfile do
  let(:token) { "3f6c0a1e9b7d4c2a8e5f1b0d7c9a6e4f" }
  let(:dir) { Dir.mktmpdir("thruster-sendfile") }
  let(:content) { "report body\n" * 100 }
  let(:path) { File.join(dir, "report.txt") }
  let(:seen) { [] }
  let(:app) do
    files = Rack::Files.new(dir)
    recorder = lambda do |env|
      seen << env.dup
      files.call(env)
    end
    Rack::Builder.new do
      use Thruster::Sendfile
      use Rack::Sendfile
      run recorder
    end.to_app
  end

  before do
    File.write(path, content)
    @saved_token = ENV.fetch(Thruster::SENDFILE_TOKEN_ENV, nil)
    ENV[Thruster::SENDFILE_TOKEN_ENV] = token
  end

  after do
    ENV[Thruster::SENDFILE_TOKEN_ENV] = @saved_token
    FileUtils.rm_rf(dir)
  end

  def get(headers = {})
    env = headers.transform_keys { |name| "HTTP_#{name.upcase.tr('-', '_')}" }
    Rack::MockRequest.new(app).get("/report.txt", env)
  end

  def expect_full_body(response)
    expect(response.status).to eq(200)
    expect(response.headers).not_to include("X-Sendfile")
    expect(response.body).to eq(content)
  end

  it "names its header and environment variable on the Thruster module" do
    expect(Thruster::SENDFILE_TOKEN_HEADER).to eq("X-Thruster-Sendfile-Token")
    expect(Thruster::SENDFILE_TOKEN_ENV).to eq("THRUSTER_RS_SENDFILE_TOKEN")
  end

  it "hands the file to the proxy (X-Sendfile, empty body) when the proxy's token is sent" do
    response = get("X-Thruster-Sendfile-Token" => token)
    expect(response.status).to eq(200)
    expect(response.headers["X-Sendfile"]).to eq(File.expand_path(path))
    expect(response.headers["Content-Length"]).to eq("0")
    expect(response.body).to eq("")
    expect(seen.last["sendfile.type"]).to eq("X-Sendfile")
  end

  it "serves the file itself without a token" do
    expect_full_body(get)
    expect(seen.last).not_to include("sendfile.type")
  end

  it "serves the file itself for a wrong token, a token of another length, or an empty one" do
    [token.reverse, "#{token}0", token[0..-2], "", " #{token}"].each do |sent|
      expect_full_body(get("X-Thruster-Sendfile-Token" => sent))
    end
    expect(seen.map { |env| env["sendfile.type"] }.uniq).to eq([nil])
  end

  it "never turns X-Sendfile on for a client that sends X-Sendfile-Type" do
    expect_full_body(get("X-Sendfile-Type" => "X-Sendfile"))
    expect_full_body(get("X-Sendfile-Type" => "X-Sendfile", "X-Thruster-Sendfile-Token" => "guess"))
  end

  it "leaves a client's X-Sendfile-Type header alone (current Rack ignores it)" do
    get("X-Sendfile-Type" => "X-Sendfile")
    expect(seen.last["HTTP_X_SENDFILE_TYPE"]).to eq("X-Sendfile")
  end

  it "is off when the environment variable is unset or empty, even for a matching header" do
    ENV.delete(Thruster::SENDFILE_TOKEN_ENV)
    expect_full_body(get("X-Thruster-Sendfile-Token" => token))
    ENV[Thruster::SENDFILE_TOKEN_ENV] = ""
    expect_full_body(get("X-Thruster-Sendfile-Token" => ""))
  end

  it "reads the expected token per request, so a new token takes effect at once" do
    ENV[Thruster::SENDFILE_TOKEN_ENV] = "next-boot-token"
    expect_full_body(get("X-Thruster-Sendfile-Token" => token))
    expect(get("X-Thruster-Sendfile-Token" => "next-boot-token").headers["X-Sendfile"]).to eq(File.expand_path(path))
  end

  it "never shows the token header to the app, whether it matches or not" do
    [token, "wrong", ""].each { |sent| get("X-Thruster-Sendfile-Token" => sent) }
    expect(seen.size).to eq(3)
    seen.each { |env| expect(env).not_to include("HTTP_X_THRUSTER_SENDFILE_TOKEN") }
  end

  it "keeps a sendfile.type that something before it already set" do
    inner = ->(env) { [200, {}, [env["sendfile.type"].to_s]] }
    response = Rack::MockRequest.new(described_class.new(inner))
                                .get("/", "sendfile.type" => "X-Accel-Redirect",
                                          "HTTP_X_THRUSTER_SENDFILE_TOKEN" => token)
    expect(response.body).to eq("X-Accel-Redirect")
  end

  it "leaves responses whose body is not a file alone" do
    inner = ->(_env) { [200, { "Content-Type" => "text/plain" }, ["generated"]] }
    stack = Rack::Sendfile.new(described_class.new(inner))
    response = Rack::MockRequest.new(stack).get("/", "HTTP_X_THRUSTER_SENDFILE_TOKEN" => token)
    expect(response.headers).not_to include("X-Sendfile")
    expect(response.body).to eq("generated")
  end
end
