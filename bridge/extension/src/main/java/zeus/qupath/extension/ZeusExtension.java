package zeus.qupath.extension;

import java.io.File;
import java.io.IOException;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardOpenOption;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;

import javafx.application.Platform;
import javafx.beans.property.BooleanProperty;
import javafx.beans.property.SimpleBooleanProperty;
import javafx.scene.Node;
import javafx.scene.control.Alert;
import javafx.scene.control.ListView;
import javafx.scene.control.Menu;
import javafx.scene.control.MenuItem;
import javafx.scene.control.SeparatorMenuItem;
import javafx.stage.Stage;
import javafx.stage.Window;
import qupath.lib.common.Version;
import qupath.lib.gui.QuPathGUI;
import qupath.lib.gui.extensions.QuPathExtension;
import qupath.lib.images.ImageData;
import qupath.lib.io.GsonTools;
import qupath.lib.objects.PathObject;
import qupath.lib.projects.Project;
import qupath.lib.projects.ProjectImageEntry;

/**
 * Extensions > ZEUS: segment through the local ZEUS service, import ZEUS results, show the heatmap, export
 * training data, learn from corrections (when the service offers it), settings with a connection check.
 * <p>
 * Everything that changes objects runs the bundled Groovy scripts of zeus-qupath (ZeusScripts): the
 * keep-edits rule and the label rule are theirs. Long work runs on one background thread, one task at a time,
 * with a progress window; the menu items wait while a task runs.
 * <p>
 * For tests: with the system property {@code zeus.extension.events=FILE}, every finished task appends one JSON
 * line ({"action", "ok", "message"}) to FILE.
 */
public class ZeusExtension implements QuPathExtension {

    static final String SCORE_PREFIX = "ZEUS score: ";

    private QuPathGUI qupath;
    private final ZeusSettings settings = new ZeusSettings();
    private final BooleanProperty busy = new SimpleBooleanProperty(false);
    private final ExecutorService worker = Executors.newSingleThreadExecutor(r -> {
        Thread t = new Thread(r, "zeus-extension");
        t.setDaemon(true);
        return t;
    });
    private MenuItem learnItem;

    @Override
    public void installExtension(QuPathGUI qupath) {
        this.qupath = qupath;
        Menu menu = qupath.getMenu("Extensions>ZEUS", true);
        MenuItem segmentImage = item("zeus-segment-image", "Segment current image", this::segmentCurrentImage);
        MenuItem segmentSelected = item("zeus-segment-selected", "Segment selected annotation(s)", this::segmentSelected);
        MenuItem importProject = item("zeus-import", "Import ZEUS results into this project", this::importProject);
        MenuItem heatmap = item("zeus-heatmap", "Show ZEUS heatmap", this::showHeatmap);
        MenuItem export = item("zeus-export", "Export training data", this::exportTrainingData);
        learnItem = item("zeus-learn", "Learn from this project's corrections", this::learn);
        learnItem.disableProperty().unbind();
        learnItem.setDisable(true);
        learnItem.setText("Learn from this project's corrections (check the connection first)");
        MenuItem settingsItem = new MenuItem("Settings (service URL, token, connection check)");
        settingsItem.setId("zeus-settings");
        settingsItem.setOnAction(e -> settings.createWindow(qupath.getStage(), this).show());
        menu.getItems().addAll(segmentImage, segmentSelected, new SeparatorMenuItem(), importProject, heatmap, export,
                new SeparatorMenuItem(), learnItem, new SeparatorMenuItem(), settingsItem);
        log("installed (zeus-qupath " + ExtensionInfo.version() + ", service API " + ZeusClient.API_VERSION + ")");
        checkInBackground();
    }

    @Override
    public String getName() {
        return "ZEUS";
    }

    /** The QuPath version it was built against and run in a window with (it loads on 0.5-0.7 too). */
    @Override
    public Version getQuPathVersion() {
        return Version.parse("0.4.4");
    }

    @Override
    public String getDescription() {
        return "ZEUS tumor pre-segmentation (zeus-qupath " + ExtensionInfo.version() + "): segment through the local "
                + "zeus serve, import results with the keep-edits rule, heatmap, training export.";
    }

    private MenuItem item(String id, String text, Runnable action) {
        MenuItem item = new MenuItem(text);
        item.setId(id);
        item.setOnAction(e -> action.run());
        item.disableProperty().bind(busy);
        return item;
    }

    void log(String text) {
        System.out.println("ZEUS extension: " + text);
    }

    /** Test hook: one JSON line per finished task into the file named by -Dzeus.extension.events. */
    private void event(String action, boolean ok, String message) {
        String file = System.getProperty("zeus.extension.events");
        if (file == null || file.isBlank())
            return;
        JsonObject line = new JsonObject();
        line.addProperty("action", action);
        line.addProperty("ok", ok);
        line.addProperty("message", message);
        try {
            Files.writeString(Paths.get(file), line + System.lineSeparator(), StandardCharsets.UTF_8,
                    StandardOpenOption.CREATE, StandardOpenOption.APPEND);
        } catch (IOException e) {
            log("cannot write the events file " + file + ": " + e.getMessage());
        }
    }

    /** The Learn item follows the service's capabilities (GET /version). Called on the JavaFX thread. */
    void capabilitiesChanged(ZeusClient.Check check) {
        if (learnItem == null)
            return;
        if (!check.ok) {
            learnItem.disableProperty().unbind();
            learnItem.setDisable(true);
            learnItem.setText("Learn from this project's corrections (the service cannot be reached: see Settings)");
        } else if (check.offers("learn")) {
            learnItem.setText("Learn from this project's corrections");
            learnItem.disableProperty().bind(busy);
        } else {
            learnItem.disableProperty().unbind();
            learnItem.setDisable(true);
            learnItem.setText("Learn from this project's corrections (not offered by zeus-qupath "
                    + check.serviceVersion + ")");
        }
    }

    private void checkInBackground() {
        Thread t = new Thread(() -> {
            try {
                ZeusClient.Check check = settings.client().check();
                log("connection check at start: " + check.message);
                Platform.runLater(() -> capabilitiesChanged(check));
            } catch (ZeusClient.ServiceException e) {
                log("connection check at start: " + e.getMessage());
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }, "zeus-connection-check");
        t.setDaemon(true);
        t.start();
    }

    private void error(String text) {
        Alert alert = new Alert(Alert.AlertType.ERROR, text);
        alert.setTitle("ZEUS");
        alert.setHeaderText(null);
        alert.initOwner(qupath.getStage());
        alert.show();
    }

    /** A task's body: runs on the worker thread and returns the message to show. */
    private interface Body {
        String run(ZeusProgress progress, CompletableFuture<?>[] request) throws Exception;
    }

    /** Runs body on the worker thread with a progress window; called on the JavaFX thread. */
    private void start(String action, String title, Body body) {
        if (busy.get())
            return;
        busy.set(true);
        CompletableFuture<?>[] request = new CompletableFuture<?>[1];
        ZeusProgress progress = new ZeusProgress(qupath.getStage(), title, () -> {
            CompletableFuture<?> f = request[0];
            if (f != null)
                f.cancel(true);
        });
        worker.submit(() -> {
            boolean ok = false;
            String message;
            try {
                message = body.run(progress, request);
                ok = true;
            } catch (InterruptedException e) {
                message = "Cancelled: " + (e.getMessage() == null || e.getMessage().equals("cancelled")
                        ? "nothing more was added." : e.getMessage());
            } catch (ZeusClient.ServiceException e) {
                message = e.getMessage();
            } catch (javax.script.ScriptException e) {
                message = "The bundled script failed: " + ZeusScripts.stackless(e);
            } catch (Exception e) {
                message = "Failed: " + ZeusScripts.stackless(e);
                e.printStackTrace();
            }
            log(action + ": " + message);
            progress.finish(message);
            boolean succeeded = ok;
            String said = message;
            Platform.runLater(() -> {  // after the progress window shows the outcome
                busy.set(false);
                event(action, succeeded, said);
            });
        });
    }

    /** The current image's project entry, or null. */
    private static ProjectImageEntry<?> entryOf(Project<?> project, ImageData<?> imageData) {
        if (project == null || imageData == null)
            return null;
        @SuppressWarnings({"unchecked", "rawtypes"})
        ProjectImageEntry<?> entry = ((Project) project).getEntry(imageData);
        return entry;
    }

    /** The path of the image's file, as the service reads it. */
    private static String slidePath(ImageData<?> imageData) throws ZeusClient.ServiceException {
        Collection<URI> uris = imageData.getServer().getURIs();
        if (uris.isEmpty())
            throw new ZeusClient.ServiceException("The current image has no file that the ZEUS service could read.");
        URI uri = uris.iterator().next();
        return "file".equalsIgnoreCase(uri.getScheme()) ? Paths.get(uri).toString() : uri.toString();
    }

    // ------------------------------------------------------------------------------------------ segment

    void segmentCurrentImage() {
        ImageData<?> imageData = qupath.getImageData();
        if (imageData == null) {
            error("Open an image first.");
            return;
        }
        Project<?> project = qupath.getProject();
        start("segment-current-image", "Segment current image", (progress, request) ->
                segment(progress, request, project, imageData, List.of()));
    }

    void segmentSelected() {
        ImageData<?> imageData = qupath.getImageData();
        if (imageData == null) {
            error("Open an image first.");
            return;
        }
        List<PathObject> regions = new ArrayList<>();
        for (PathObject o : imageData.getHierarchy().getSelectionModel().getSelectedObjects()) {
            if (o.isAnnotation() && o.getROI() != null && o.getROI().isArea())
                regions.add(o);
        }
        if (regions.isEmpty()) {
            error("Select one or more annotations with an area (the regions to segment) first.");
            return;
        }
        Project<?> project = qupath.getProject();
        start("segment-selected", "Segment selected annotation(s)", (progress, request) ->
                segment(progress, request, project, imageData, regions));
    }

    /** One request per region (none: the whole image), each answer merged by the bundled segment script. */
    private String segment(ZeusProgress progress, CompletableFuture<?>[] request, Project<?> project,
            ImageData<?> imageData, List<PathObject> regions) throws Exception {
        ZeusClient client = settings.client();
        String slide = slidePath(imageData);
        int n = Math.max(1, regions.size());
        List<String> summaries = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            PathObject region = regions.isEmpty() ? null : regions.get(i);
            JsonObject body = new JsonObject();
            body.addProperty("slide", slide);
            if (region != null)
                // toJson, then parse: QuPath 0.4.4's ROI adapter cannot write into a JsonTreeWriter (toJsonTree throws)
                body.add("region", JsonParser.parseString(GsonTools.getInstance().toJson(region.getROI())));
            String what = region == null ? "the image" : "annotation " + (i + 1) + " of " + n;
            progress.cancellable(true);
            progress.update("ZEUS is segmenting " + what + " (" + new File(slide).getName() + ") ...", (double) i / n);
            String answer;
            try {
                answer = client.segment(body, Duration.ofMinutes(60), request);
            } catch (InterruptedException e) {
                throw new InterruptedException(i == 0 ? "nothing was added." : "the first " + i + " of " + n
                        + " annotation(s) were segmented and added; nothing more.");
            }
            if (progress.isCancelled())
                throw new InterruptedException(i == 0 ? "nothing was added." : "after " + i + " of " + n + " annotation(s).");
            progress.cancellable(false);
            progress.update("Adding the results of " + what + " (keep-edits rule) ...", (i + 0.9) / n);
            Path answerFile = Files.createTempFile("zeus-answer", ".geojson");
            try {
                Files.writeString(answerFile, answer, StandardCharsets.UTF_8);
                String output = ZeusScripts.run(ZeusScripts.SEGMENT, project, imageData,
                        "ANSWER_FILE=" + answerFile, "REGION_ID=" + (region == null ? "" : region.getID().toString()));
                String line = ZeusScripts.lastZeusLine(output.replace("ZEUS: image data saved", ""));
                String added = output.lines().filter(l -> l.startsWith("ZEUS: Added")).findFirst().orElse(line);
                summaries.add(added.replaceFirst("^ZEUS(: | error: )", ""));
            } finally {
                Files.deleteIfExists(answerFile);
            }
        }
        return String.join("\n", summaries);
    }

    // ------------------------------------------------------------------------------------------ import, heatmap

    void importProject() {
        Project<?> project = qupath.getProject();
        if (project == null) {
            error("Open the project that zeus segment --project wrote first (File > Open project).");
            return;
        }
        ImageData<?> current = qupath.getImageData();
        start("import", "Import ZEUS results", (progress, request) -> {
            ProjectImageEntry<?> currentEntry = entryOf(project, current);
            List<? extends ProjectImageEntry<?>> entries = project.getImageList();
            int done = 0;
            int imported = 0;
            List<String> lines = new ArrayList<>();
            for (ProjectImageEntry<?> entry : entries) {
                if (progress.isCancelled())
                    throw new InterruptedException("after " + done + " of " + entries.size() + " image(s).");
                progress.update("Importing into " + entry.getImageName() + " (" + (done + 1) + " of " + entries.size()
                        + ") ...", (double) done / entries.size());
                done++;
                if (!Files.isRegularFile(entry.getEntryPath().resolve("zeus_annotations.geojson")))
                    continue;
                ImageData<?> imageData = entry == currentEntry ? current : entry.readImageData();
                String output = ZeusScripts.run(ZeusScripts.IMPORT, project, imageData);
                imported++;
                output.lines().filter(l -> l.contains(": replaced ")).findFirst().ifPresent(lines::add);
            }
            if (imported == 0)
                return "No image of this project has ZEUS results (data/<entry>/zeus_annotations.geojson): run zeus "
                        + "segment --project on it first.";
            return "Imported ZEUS results into " + imported + " image(s).\n" + String.join("\n", lines).replace("ZEUS import: ", "");
        });
    }

    void showHeatmap() {
        ImageData<?> imageData = qupath.getImageData();
        if (imageData == null) {
            error("Open an image first.");
            return;
        }
        Project<?> project = qupath.getProject();
        start("heatmap", "Show ZEUS heatmap", (progress, request) -> {
            progress.update("Importing the heatmap tiles ...", -1);
            ProjectImageEntry<?> entry = entryOf(project, imageData);
            if (entry == null || !Files.isRegularFile(entry.getEntryPath().resolve("zeus_tiles.geojson")))
                throw new ZeusClient.ServiceException("This image has no ZEUS heatmap tiles (data/<entry>/zeus_tiles.geojson): "
                        + "run zeus segment --project ... --tiles on it.");
            ZeusScripts.run(ZeusScripts.IMPORT, project, imageData);
            String measurement = SCORE_PREFIX + positiveClass(imageData);
            CompletableFuture<String> shown = new CompletableFuture<>();
            Platform.runLater(() -> openMeasurementMap(measurement, shown, 50));
            return shown.get();
        });
    }

    /** The class of ZEUS's annotations ("ZEUS <class>"), else Tumor. */
    private static String positiveClass(ImageData<?> imageData) {
        for (PathObject o : imageData.getHierarchy().getAnnotationObjects()) {
            String name = o.getName();
            if (name != null && name.startsWith("ZEUS ") && o.getPathClass() != null)
                return o.getPathClass().toString();
        }
        return "Tumor";
    }

    /** Measure > Show measurement maps, then selects the measurement in its list (plain JavaFX). */
    private void openMeasurementMap(String measurement, CompletableFuture<String> shown, int triesLeft) {
        qupath.getOverlayOptions().setFillDetections(true);
        Stage maps = measurementMapWindow();
        if (maps == null) {
            MenuItem item = findMenuItem(qupath.getMenuBar().getMenus(), "Measure", "Show measurement maps");
            if (item == null) {
                shown.complete("Tiles imported; open Measure > Show measurement maps and choose " + measurement + ".");
                return;
            }
            item.fire();
            maps = measurementMapWindow();
        }
        ListView<?> list = maps == null ? null : measurementList(maps.getScene().getRoot());
        if (list != null && list.getItems().contains(measurement)) {
            list.getSelectionModel().clearSelection();
            list.getSelectionModel().select(list.getItems().indexOf(measurement));
            list.scrollTo(list.getItems().indexOf(measurement));
            maps.toFront();
            shown.complete("Heatmap shown: Measurement maps on '" + measurement + "' (detections filled).");
        } else if (triesLeft > 0) {
            Thread t = new Thread(() -> {
                try {
                    Thread.sleep(100);
                } catch (InterruptedException e) {
                    return;
                }
                Platform.runLater(() -> openMeasurementMap(measurement, shown, triesLeft - 1));
            });
            t.setDaemon(true);
            t.start();
        } else {
            shown.complete("Tiles imported, but the measurement map list has no '" + measurement + "': choose a "
                    + SCORE_PREFIX + "measurement in Measure > Show measurement maps.");
        }
    }

    private static Stage measurementMapWindow() {
        for (Window w : Window.getWindows()) {
            if (w instanceof Stage && "Measurement maps".equals(((Stage) w).getTitle()) && w.isShowing())
                return (Stage) w;
        }
        return null;
    }

    private static ListView<?> measurementList(Node root) {
        for (Node node : root.lookupAll(".list-view")) {
            if (node instanceof ListView)
                return (ListView<?>) node;
        }
        return null;
    }

    private static MenuItem findMenuItem(List<? extends MenuItem> items, String... path) {
        for (MenuItem item : items) {
            if (!path[0].equals(item.getText()))
                continue;
            if (path.length == 1)
                return item;
            if (item instanceof Menu) {
                String[] rest = new String[path.length - 1];
                System.arraycopy(path, 1, rest, 0, rest.length);
                return findMenuItem(((Menu) item).getItems(), rest);
            }
        }
        return null;
    }

    // ------------------------------------------------------------------------------------------ export, learn

    void exportTrainingData() {
        Project<?> project = qupath.getProject();
        if (project == null) {
            error("Open a project first: training data is exported per project.");
            return;
        }
        ImageData<?> current = qupath.getImageData();
        start("export", "Export training data", (progress, request) -> {
            progress.update("Exporting the project's annotations and label masks ...", -1);
            String output = ZeusScripts.run(ZeusScripts.EXPORT, project, current);
            String last = ZeusScripts.lastZeusLine(output).replace("ZEUS export: ", "");
            return last.isEmpty() ? "Export finished." : last;
        });
    }

    void learn() {
        Project<?> project = qupath.getProject();
        if (project == null) {
            error("Open a project first: ZEUS learns from the corrections saved in it.");
            return;
        }
        start("learn", "Learn from this project's corrections", (progress, request) -> {
            progress.update("Asking the ZEUS service to learn from " + project.getPath() + " ...", -1);
            JsonObject body = new JsonObject();
            body.addProperty("project", project.getPath().toString());
            String answer;
            try {
                answer = settings.client().post("/learn", body, Duration.ofMinutes(120), request);
            } catch (ZeusClient.ServiceException e) {
                // a refusal (422: nothing to learn from, e.g. run Export training data first): the service's own line
                if (e.status >= 400 && e.status < 500 && e.status != 401 && e.error != null && !e.error.isBlank())
                    throw new ZeusClient.ServiceException(e.error, e.status, e.error);
                throw e;
            }
            LearnResult result = LearnResult.parse(answer);  // written: false is a result, not an error
            Platform.runLater(() -> result.show(qupath.getStage()));
            return result.summary();
        });
    }
}
