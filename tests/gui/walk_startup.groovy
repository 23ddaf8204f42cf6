// walk_startup.groovy -- QuPath's startup.groovy for tests/gui/test_extension_gui.py (one QuPath start, the whole walk).
// Drives Extensions > ZEUS through its menu items (MenuItem.fire(): clicks from xdotool do not open JavaFX menus on a
// bare Xvfb) and the Settings window's controls, and writes QuPath's state after each step to
// <zeus.walk.dir>/NN-step.json; it then waits for NN-step.shot (the test's screenshot) before going on.
// System properties (JAVA_OPTS): zeus.walk.dir, zeus.walk.url, zeus.walk.token, zeus.extension.events.
import javafx.application.Platform
import javafx.stage.Stage
import javafx.stage.Window
import java.util.concurrent.CompletableFuture
import java.util.concurrent.TimeUnit
import qupath.lib.gui.QuPathGUI
import qupath.lib.io.GsonTools
import qupath.lib.objects.PathObjects
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.ROIs

def qupath = QuPathGUI.getInstance()
def dir = new File(System.getProperty('zeus.walk.dir'))
def events = new File(System.getProperty('zeus.extension.events'))
def out = new PrintWriter(System.out, true)
def gson = GsonTools.getInstance()

def onFx = { Closure c ->
    def f = new CompletableFuture()
    Platform.runLater { try { f.complete(c.call()) } catch (Throwable t) { f.completeExceptionally(t) } }
    return f.get(60, TimeUnit.SECONDS)
}
def zeusItems = { qupath.getMenu('Extensions>ZEUS', false).getItems().findAll { it.getId() != null } }
def fire = { String id -> onFx { zeusItems().find { it.getId() == id }.fire(); null } }
def stage = { String title -> Window.getWindows().find { it instanceof Stage && it.getTitle() == title && it.isShowing() } }
def eventCount = { events.isFile() ? events.readLines('UTF-8').size() : 0 }
def waitEvent = { int before ->
    for (int i = 0; i < 6000 && eventCount() <= before; i++) Thread.sleep(100)
    return gson.fromJson(events.readLines('UTF-8')[-1], Map)
}
def hierarchyState = {
    def h = qupath.getImageData().getHierarchy()
    def annotations = h.getAnnotationObjects().collect {
        [id: it.getID().toString(), name: it.getName(), cls: it.getPathClass() == null ? null : it.getPathClass().toString(),
         locked: it.isLocked(), geometry: gson.fromJson(gson.toJson(it.getROI()), Map)]
    }
    def tiles = h.getAllObjects(false).findAll { it.isTile() }
    def scores = new TreeSet()
    tiles.each { t -> scores.addAll(t.getMeasurementList().getMeasurementNames().findAll { it.startsWith('ZEUS score: ') }) }
    return [annotations: annotations, tiles: tiles.size(), scoreMeasurements: scores as List]
}
int stepNo = 0
def step = { String name, Map state ->
    stepNo++
    String base = String.format('%02d-%s', stepNo, name)
    def tmp = new File(dir, base + '.json.tmp')
    tmp.setText(gson.toJson(state), 'UTF-8')
    tmp.renameTo(new File(dir, base + '.json'))
    def shot = new File(dir, base + '.shot')
    for (int i = 0; i < 1200 && !shot.exists(); i++) Thread.sleep(100)
    out.println("ZEUS walk: step ${base} done")
}
def closeProgress = { onFx { Window.getWindows().findAll { it instanceof Stage && it.getTitle()?.startsWith('ZEUS: ') }.each { it.close() }; null } }

Thread.start {
    try {
        for (int i = 0; i < 1200 && qupath.getImageData() == null; i++) Thread.sleep(100)
        Thread.sleep(2000)
        // 1. the menu
        def items = onFx {
            qupath.getMenu('Extensions', false).show()
            zeusItems().collect { [id: it.getId(), text: it.getText(), disabled: it.isDisable()] }
        }
        Thread.sleep(500)
        onFx { qupath.getMenu('Extensions>ZEUS', false).show(); null }
        Thread.sleep(1000)
        step('menu', [items: items])
        onFx { qupath.getMenu('Extensions>ZEUS', false).hide(); qupath.getMenu('Extensions', false).hide(); null }

        // 2. Settings: a wrong token, then the right one; Save
        def check = { String token ->
            onFx {
                def s = stage('ZEUS settings')
                s.getScene().lookup('#zeus-service-url').setText(System.getProperty('zeus.walk.url'))
                s.getScene().lookup('#zeus-token').setText(token)
                s.getScene().lookup('#zeus-check').fire()
                null
            }
            String text = ''
            for (int i = 0; i < 300; i++) {
                text = onFx { stage('ZEUS settings').getScene().lookup('#zeus-check-result').getText() }
                if (text.startsWith('OK:') || text.startsWith('Problem:')) break
                Thread.sleep(100)
            }
            Thread.sleep(300)
            return text
        }
        fire('zeus-settings')
        for (int i = 0; i < 100 && stage('ZEUS settings') == null; i++) Thread.sleep(100)
        step('settings-wrong-token', [result: check('wrong-token-0123456789abcdef')])
        String ok = check(System.getProperty('zeus.walk.token'))
        def learn = onFx { def item = zeusItems().find { it.getId() == 'zeus-learn' }; [text: item.getText(), disabled: item.isDisable()] }
        step('settings-connected', [result: ok, learn: learn])
        onFx { stage('ZEUS settings').getScene().lookup('#zeus-save').fire(); null }

        // 3. Import ZEUS results into this project
        int n = eventCount(); fire('zeus-import'); def ev = waitEvent(n)
        step('import', [event: ev] + hierarchyState())
        closeProgress()

        // 4. the annotator moves one ZEUS annotation 40 px to the right (QuPath's API) and saves
        def moved = onFx {
            def imageData = qupath.getImageData()
            def o = imageData.getHierarchy().getAnnotationObjects().findAll { it.getName() == 'ZEUS Tumor' }
                    .max { it.getROI().getArea() }
            o.setROI(o.getROI().translate(40, 0))
            imageData.getHierarchy().fireHierarchyChangedEvent(this)
            qupath.getProject().getEntry(imageData).saveImageData(imageData)
            o.getID().toString()
        }
        step('edit', [moved: moved] + hierarchyState())

        // 5. Segment current image against the live zeus serve
        n = eventCount(); fire('zeus-segment-image'); ev = waitEvent(n)
        Thread.sleep(500)
        step('segment', [event: ev, moved: moved] + hierarchyState())
        closeProgress()

        // 6. a second import: the edit survives
        n = eventCount(); fire('zeus-import'); ev = waitEvent(n)
        step('reimport', [event: ev, moved: moved] + hierarchyState())
        closeProgress()

        // 7. the annotator draws a rectangle over the left half of an untouched ZEUS annotation, selects it, and
        // runs Segment selected annotation(s)
        def rect = onFx {
            def h = qupath.getImageData().getHierarchy()
            def target = h.getAnnotationObjects().findAll { it.getName() == 'ZEUS Tumor' && it.getID().toString() != moved }
                    .max { it.getROI().getArea() }
            def r = target.getROI()
            def o = PathObjects.createAnnotationObject(ROIs.createRectangleROI(r.getBoundsX() - 8, r.getBoundsY() - 8,
                    r.getBoundsWidth() / 2, r.getBoundsHeight() + 16, ImagePlane.getDefaultPlane()))
            h.addObject(o)
            h.getSelectionModel().setSelectedObject(o)
            o.getID().toString()
        }
        n = eventCount(); fire('zeus-segment-selected'); ev = waitEvent(n)
        Thread.sleep(500)
        step('segment-selected', [event: ev, moved: moved, rectangle: rect] + hierarchyState())
        closeProgress()

        // 8. Show ZEUS heatmap
        n = eventCount(); fire('zeus-heatmap'); ev = waitEvent(n)
        closeProgress()
        Thread.sleep(1000)
        def maps = onFx {
            def s = stage('Measurement maps')
            def list = s == null ? null : s.getScene().getRoot().lookupAll('.list-view').find { true }
            [open: s != null, selected: list?.getSelectionModel()?.getSelectedItem(),
             fillDetections: qupath.getOverlayOptions().getFillDetections()]
        }
        step('heatmap', [event: ev, maps: maps] + hierarchyState())

        // 9a. Learn before any export: the service refuses (422, nothing to learn from); its line is shown as is
        n = eventCount(); fire('zeus-learn'); ev = waitEvent(n)
        step('learn-refused', [event: ev, dialog: onFx { stage('ZEUS: Learn result') != null }])
        closeProgress()

        // 9. Export training data
        n = eventCount(); fire('zeus-export'); ev = waitEvent(n)
        step('export', [event: ev])
        closeProgress()

        // 10. Learn from this project's corrections (after the export: without paquo the service reads <project>/export/)
        n = eventCount(); fire('zeus-learn'); ev = waitEvent(n)
        def learned = onFx {
            def s = stage('ZEUS: Learn result')
            if (s == null)
                return null
            def root = s.getScene().getRoot()
            def area = root.lookup('#zeus-learn-table')
            [headline: root.lookup('#zeus-learn-headline').getText(), message: root.lookup('#zeus-learn-message').getText(),
             text: area.getText(), font: area.getFont().getFamily()]
        }
        def progressText = onFx { Window.getWindows().find { it instanceof Stage && it.getTitle() == "ZEUS: Learn from this project's corrections" }?.getScene()?.getRoot()?.lookup('#zeus-progress-message')?.getText() }
        step('learn', [event: ev, dialog: learned, progress: progressText])
        closeProgress()
        step('done', [:])
        System.exit(0)  // the test has what it needs; QuPath's own exit would ask about unsaved changes
    } catch (Throwable t) {
        out.println('ZEUS walk: failed: ' + t)
        t.printStackTrace()
        new File(dir, 'walk-error.txt').setText(t.toString(), 'UTF-8')
    }
}
