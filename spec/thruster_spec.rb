# frozen_string_literal: true

require "spec_helper"
require "English"
require "rbconfig"

RSpec.describe "Thruster (Ruby side)" do
  def ruby_run(env, script)
    out = IO.popen(env, [RbConfig.ruby, "-I", File.join(ROOT, "lib"), "-e", script], err: %i[child out], &:read)
    [out, $CHILD_STATUS]
  end

  it "loads the compiled extension built from the same version" do
    out, status = ruby_run({}, 'require "thruster-rs"; print Thruster::Native.core_version')
    expect(status).to be_success
    expect(out).to eq(Thruster::VERSION)
  end

  context "with basecamp's thruster gem also activated" do
    let(:gem_home) { Dir.mktmpdir("basecamp-thruster") }
    let(:env) { { "GEM_HOME" => gem_home, "GEM_PATH" => ([gem_home] + Gem.default_path).join(":"), "RUBYOPT" => nil } }

    before do
      src = File.join(FIXTURES, "basecamp_thruster")
      built = IO.popen([Gem.ruby, "-S", "gem", "build", "thruster.gemspec"], chdir: src, err: %i[child out], &:read)
      raise built unless $CHILD_STATUS.success?

      gem_file = File.join(src, "thruster-0.1.22.gem")
      installed = IO.popen(env, [Gem.ruby, "-S", "gem", "install", "--local", "--no-document", gem_file],
                           err: %i[child out], &:read)
      File.delete(gem_file)
      raise installed unless $CHILD_STATUS.success?
    end

    it "warns at require time, naming the fix" do
      out, status = ruby_run(env, 'gem "thruster"; require "thruster-rs"')
      expect(status).to be_success
      expect(out).to include("basecamp's `thruster` gem is also loaded", 'remove `gem "thruster"`')
    end

    it "warns when exe/thrust starts" do
      script = "gem 'thruster'; ARGV.replace(['--version']); load #{File.join(ROOT, 'exe/thrust').inspect}"
      out, status = ruby_run(env, script)
      expect(status).to be_success
      expect(out).to include("basecamp's `thruster` gem is also loaded", "thrust (thruster-rs) #{Thruster::VERSION}")
    end

    it "stays quiet without it" do
      out, status = ruby_run({}, 'require "thruster-rs"')
      expect(status).to be_success
      expect(out).to eq("")
    end
  end
end
